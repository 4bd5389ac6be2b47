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
#: nothing is fetched from the network).
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
        "flask.ctx.AppContext",
        "unittest.case.TestCase",
        "flask.wrappers.Response",
        "psycopg.Connection",
        "psycopg_pool.pool.ConnectionPool",
        "werkzeug.exceptions.HTTPException",
        "werkzeug.exceptions.ServiceUnavailable",
        "flask_reqconn.extension.F",  # the TypeVar of the decorators
        "os.PathLike",
        "sqlalchemy.engine.base.Engine",
        "sqlalchemy.engine.url.URL",
        "t.Any",
    )
] + [("py:exc", "sqlalchemy.exc.ArgumentError")]

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
