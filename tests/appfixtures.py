"""Fixtures building Flask apps with flask-reqconn against the test PostgreSQL.

A pytest plugin (registered in tests/conftest.py).

Every app made by ``make_app`` is checked at teardown: no lease may still be
checked out, and its pool is closed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from flask import Flask

from flask_reqconn import ReqConn
from flask_reqconn.netdefaults import uses_tcp
from tests import pg

AppFactory = Callable[..., Flask]

#: The abort storm of the server matrices (``StormConfig`` keywords): small enough for a
#: few minutes on two cores for a whole module; every abort style is used 8 times.
MATRIX_STORM: dict[str, Any] = {
    "normal_count": 30,
    "normal_concurrency": 6,
    "abort_count": 32,
    "abort_concurrency": 8,
    "stream_path": "/feed",
    "drain_timeout": 15.0,
    "health_path": "/health",
    "final_count": 20,
    "final_concurrency": 6,
    "stats_url": "/stats",
    "max_seconds": 120.0,
}


@pytest.fixture
def make_app(pg_dsn: str) -> Iterator[AppFactory]:
    """``make_app(**config)`` -> a Flask app with ``ReqConn`` set up.

    Config keys are given without the ``REQCONN_`` prefix (``max_size=2``).
    Each app gets its own ``application_name`` (``app.config["TEST_APPNAME"]``)
    so ``pg_stat_activity`` can be filtered per test.
    """
    made: list[tuple[Flask, ReqConn]] = []

    def factory(*, ext: ReqConn | None = None, init: bool = True, **config: Any) -> Flask:
        appname = pg.unique_name("rc")
        app = Flask(appname)
        app.config["TESTING"] = False
        app.config["REQCONN_CONNINFO"] = pg.with_conninfo(pg_dsn, application_name=appname)
        app.config["REQCONN_MIN_SIZE"] = 0
        app.config["REQCONN_MAX_SIZE"] = 2
        app.config["REQCONN_TIMEOUT"] = 10.0
        for key, value in config.items():
            app.config[f"REQCONN_{key.upper()}"] = value
        app.config["TEST_APPNAME"] = appname
        reqconn = ext or ReqConn()
        if init:
            reqconn.init_app(app)
            made.append((app, reqconn))
        app.extensions["test_reqconn"] = reqconn
        return app

    yield factory
    leaks = []
    for app, reqconn in made:
        stats = reqconn.stats(app)
        if stats["checked_out"]:
            leaks.append(f"{app.name}: {stats['checked_out']} checked out: {stats}")
        reqconn.close(app)
    assert not leaks, "leases leaked by the test:\n" + "\n".join(leaks)


def reqconn_of(app: Flask) -> ReqConn:
    return app.extensions["test_reqconn"]  # type: ignore[no-any-return]


def backend_pid(conn: psycopg.Connection[Any]) -> int:
    return conn.info.backend_pid


@pytest.fixture(scope="session")
def pg_tcp_dsn(pg_dsn: str, pg_admin: psycopg.Connection[Any]) -> str:
    """The test server over TCP on the loopback: ``pg_dsn`` if it is TCP already.

    The embedded server listens on 127.0.0.1 too; a ``$REQCONN_TEST_DSN`` server reached
    over a unix socket that does not listen there skips the test, saying so.
    """
    if uses_tcp(pg_dsn):
        return pg_dsn
    row = pg_admin.execute(
        "select current_setting('listen_addresses'), current_setting('port')"
    ).fetchone()
    assert row is not None
    listen, port = row
    addresses = {a.strip() for a in str(listen).split(",")}
    if not addresses & {"*", "0.0.0.0", "127.0.0.1", "localhost"}:
        pytest.skip(f"the test server does not listen on 127.0.0.1 (listen_addresses={listen!r})")
    dsn = pg.with_conninfo(pg_dsn, host="127.0.0.1", port=port)
    try:
        psycopg.connect(dsn, connect_timeout=10).close()
    except psycopg.OperationalError as exc:
        pytest.skip(f"the test server refuses TCP on 127.0.0.1:{port}: {exc}")
    return dsn


@pytest.fixture
def what_table(pg_admin: psycopg.Connection[Any]) -> Iterator[str]:
    """A scratch table ``(what text)`` for the rows a test's requests write; dropped after."""
    name = pg.unique_name("what")
    pg_admin.execute(f"create table {name} (what text)")
    yield name
    pg_admin.execute(f"drop table {name}")


def what_rows(pg_admin: psycopg.Connection[Any], table: str) -> list[str]:
    """The rows of a :func:`what_table`, sorted."""
    return [r[0] for r in pg_admin.execute(f"select what from {table} order by what")]
