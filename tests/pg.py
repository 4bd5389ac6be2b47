"""PostgreSQL helpers for the test modules: the kit's, from :mod:`flask_reqconn.testing`.

Kept so that the test modules' ``from tests import pg`` and ``pg.unique_name(...)`` read as
before; the code lives in ``flask_reqconn/testing/postgres.py``.
"""

from __future__ import annotations

from flask_reqconn.testing.postgres import (
    DSN_ENV,
    MAX_CONNECTIONS,
    PgSetupError,
    app_sessions,
    check_dsn,
    create_database,
    drop_database,
    embedded_server,
    pg_server,
    pid_from_pidfile,
    redacted,
    run_sql_file,
    unique_name,
    wait_until,
    with_conninfo,
)
from flask_reqconn.testing.procs import pid_alive, wait_gone
from flask_reqconn.testing.watchdog import (
    POSTGRES_STOP,
    Watchdog,
    release_watchdog,
    start_watchdog,
)

__all__ = [
    "DSN_ENV",
    "MAX_CONNECTIONS",
    "POSTGRES_STOP",
    "PgSetupError",
    "Watchdog",
    "app_sessions",
    "check_dsn",
    "create_database",
    "drop_database",
    "embedded_server",
    "pg_server",
    "pid_alive",
    "pid_from_pidfile",
    "redacted",
    "release_watchdog",
    "run_sql_file",
    "start_watchdog",
    "unique_name",
    "wait_gone",
    "wait_until",
    "with_conninfo",
]
