"""Sphinx configuration for flask-reqconn.

Build with warnings as errors, outside the repository::

    sphinx-build -W --keep-going -b html docs /tmp/docs-out

Only Sphinx's built-in extensions are used, and nothing is fetched from the
network (no intersphinx).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flask_reqconn  # noqa: E402

project = "flask-reqconn"
author = "flask-reqconn developers"
copyright = f"2026, {author}"
release = flask_reqconn.__version__
version = ".".join(release.split(".")[:2])

extensions = ["sphinx.ext.autodoc"]

exclude_patterns = ["_build"]
default_role = "code"
nitpicky = True
#: Names from other projects, which have no inventory here (no intersphinx:
#: nothing is fetched from the network), and the storm tool's functions,
#: whose API page comes with the storm package.
nitpick_ignore = [
    ("py:class", name)
    for name in (
        "Blueprint",
        "CollectorRegistry",
        "SansIOResponse",
        "collections.abc.Callable",
        "collections.abc.Iterator",
        "collections.abc.Mapping",
        "flask.app.Flask",
        "flask.blueprints.Blueprint",
        "flask.wrappers.Response",
        "psycopg.Connection",
        "psycopg_pool.pool.ConnectionPool",
        "werkzeug.exceptions.HTTPException",
        "werkzeug.exceptions.ServiceUnavailable",
        "flask_reqconn.extension.F",  # the TypeVar of the decorators
        "sqlalchemy.engine.base.Engine",
        "sqlalchemy.engine.url.URL",
        "os.PathLike",
        "t.Any",  # a signature spelled with the typing alias
    )
] + [
    ("py:exc", "sqlalchemy.exc.ArgumentError"),
    ("py:meth", "recreate"),  # SQLAlchemy's Pool.recreate, in RequestPool's docstring
    ("py:func", "flask_reqconn.storm.run_storm"),
    ("py:func", "flask_reqconn.storm.format_report"),
]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False

html_theme = "alabaster"
html_title = f"flask-reqconn {release}"
html_theme_options = {
    "description": "One PostgreSQL connection per Flask request, always given back.",
    "fixed_sidebar": True,
}
