"""Server subprocesses and the raw-socket HTTP client for the test modules.

The kit's (:mod:`flask_reqconn.testing`), with the repository as the servers' default
working directory, so that ``tests.apps.hello:app`` imports wherever pytest runs from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask_reqconn.testing import servers as _servers
from flask_reqconn.testing.http import (
    http_get,
    raw_connect,
    read_first_chunk_and_drop,
    send_and_close,
)
from flask_reqconn.testing.procs import descendants, group_members, pid_alive
from flask_reqconn.testing.servers import ServerError, ServerProcess, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent


def gunicorn(app_spec: str, **kwargs: Any) -> ServerProcess:
    """:func:`flask_reqconn.testing.gunicorn`, run in the repository."""
    kwargs.setdefault("cwd", REPO_ROOT)
    return _servers.gunicorn(app_spec, **kwargs)


def werkzeug_dev(app_spec: str, **kwargs: Any) -> ServerProcess:
    """:func:`flask_reqconn.testing.werkzeug_dev`, run in the repository."""
    kwargs.setdefault("cwd", REPO_ROOT)
    return _servers.werkzeug_dev(app_spec, **kwargs)


def waitress(app_spec: str, **kwargs: Any) -> ServerProcess:
    """:func:`flask_reqconn.testing.waitress`, run in the repository."""
    kwargs.setdefault("cwd", REPO_ROOT)
    return _servers.waitress(app_spec, **kwargs)


__all__ = [
    "REPO_ROOT",
    "ServerError",
    "ServerProcess",
    "descendants",
    "free_port",
    "group_members",
    "gunicorn",
    "http_get",
    "pid_alive",
    "raw_connect",
    "read_first_chunk_and_drop",
    "send_and_close",
    "waitress",
    "werkzeug_dev",
]
