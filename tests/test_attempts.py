"""A database that refuses connections says so (:mod:`flask_reqconn.attempts`).

Real refusals: a closed port on 127.0.0.1, a database that does not exist, and a second
embedded PostgreSQL with ``max_connections = 6`` whose slots the test fills ("remaining
connection slots are reserved" for an ordinary role, "too many clients" for a superuser).
A request that times out waiting for the pool then gets 503 with ``Retry-After`` and a
message saying the database refused or could not be reached, counted in ``refused`` (not
``exhausted``); one WARNING of ours per burst and none of psycopg_pool's per attempt;
``/ready`` and the stats name the cause. The first connection of a pool warns when the
server's usable slots cannot hold ``MAX_SIZE`` per worker.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from flask import Flask

from flask_reqconn import DatabaseRefused, PoolExhausted, get_conn
from flask_reqconn.testing import embedded_server, wait_until
from tests import pg, servers
from tests.appfixtures import AppFactory, reqconn_of

REFUSING = "database refusing connections"
SECRET = "Xq7Zk2Vw9Jp"
#: max_connections of the refusing server; 3 of them are superuser_reserved_connections
LOW_MAX_CONNECTIONS = 6


def closed_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_views(app: Flask) -> Flask:
    @app.get("/")
    def index() -> str:
        get_conn().execute("select 1")
        return "ok"

    app.register_blueprint(reqconn_of(app).health_blueprint(), url_prefix="/_")
    return app


def ours(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("flask_reqconn") and r.levelno == level
    ]


def psycopg_attempt_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "psycopg.pool"
            and r.getMessage().startswith("error connecting")]  # fmt: skip


def get_refused(app: Flask, path: str = "/") -> tuple[float, Any]:
    started = time.monotonic()
    response = app.test_client().get(path)
    return time.monotonic() - started, response


def assert_refused_answer(response: Any) -> None:
    assert response.status_code == 503, response.get_data(as_text=True)
    assert response.headers["Retry-After"] == "1"
    body = response.get_data(as_text=True)
    assert "database refused" in body and "could not be reached" in body, body
    assert "no free database connection" not in body


@contextlib.contextmanager
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    with (  # the last one sets the capturing handler's level: DEBUG
        caplog.at_level(logging.INFO, logger="psycopg.pool"),
        caplog.at_level(logging.DEBUG, logger="flask_reqconn"),
    ):
        yield


# -- unreachable and unknown: no server needed -------------------------------------------


def test_a_closed_port_is_answered_503_database_refusing_within_the_timeout(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    conninfo = f"host=127.0.0.1 port={closed_port()} password={SECRET} connect_timeout=2"
    app = with_views(make_app(conninfo=conninfo, timeout=0.5, max_size=2))
    with logs(caplog):
        elapsed, response = get_refused(app)
        assert_refused_answer(response)
        assert elapsed < 1.5
        for _ in range(4):
            assert_refused_answer(get_refused(app)[1])
        _, ready = get_refused(app, "/_/ready")
    assert ready.status_code == 503
    reason = ready.get_json()["reason"]
    assert reason.startswith(f"{REFUSING}: "), reason
    assert "Connection refused" in reason
    stats = reqconn_of(app).stats(app)
    assert (stats["refused"], stats["exhausted"]) == (5, 0)
    assert "Connection refused" in stats["pools"]["default"]["refusing"]
    warnings = ours(caplog)
    assert len(warnings) == 1, warnings  # one per burst, not one per attempt or request
    assert f"{REFUSING}: " in warnings[0]
    assert "host and port of REQCONN_CONNINFO" in warnings[0]
    attempts = [m for m in ours(caplog, logging.DEBUG) if "connection attempt of pool" in m]
    assert len(attempts) >= 3, attempts  # ~2 a second, folded into that one WARNING
    assert psycopg_attempt_lines(caplog) == []
    everything = [r.getMessage() for r in caplog.records] + [reason, str(stats)]
    assert not [m for m in everything if SECRET in m]


def test_a_database_that_does_not_exist_is_answered_503_database_refusing(
    make_app: AppFactory, pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    conninfo = pg.with_conninfo(pg_dsn, dbname="no_such_database_here", password=SECRET)
    app = with_views(make_app(conninfo=conninfo, timeout=0.5))
    with logs(caplog):
        elapsed, response = get_refused(app)
    assert_refused_answer(response)
    assert elapsed < 1.5
    assert 'database "no_such_database_here" does not exist' in (
        reqconn_of(app).stats(app)["pools"]["default"]["refusing"]
    )
    (warning,) = ours(caplog)
    assert "check the user, password and database name of REQCONN_CONNINFO" in warning
    assert psycopg_attempt_lines(caplog) == []
    with pytest.raises(DatabaseRefused) as info:  # outside requests too, and uncounted
        with reqconn_of(app).connection(app=app, timeout=0.2):
            pass
    assert isinstance(info.value, PoolExhausted)  # what existing handlers catch
    assert reqconn_of(app).stats(app)["refused"] == 1


def test_a_pool_whose_connections_are_all_busy_is_still_exhausted(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app = with_views(make_app(timeout=0.3, max_size=1))
    assert app.test_client().get("/").status_code == 200
    with logs(caplog), reqconn_of(app).connection(app=app):
        response = app.test_client().get("/")
        ready = app.test_client().get("/_/ready")
    assert response.status_code == 503
    assert "no free database connection" in response.get_data(as_text=True)
    assert ready.get_json()["reason"] == "pool exhausted"
    stats = reqconn_of(app).stats(app)
    assert (stats["refused"], stats["exhausted"]) == (0, 1)
    assert stats["pools"]["default"]["refusing"] is None
    assert not [m for m in ours(caplog) if REFUSING in m]


# -- a server out of connection slots -----------------------------------------------------


@pytest.fixture(scope="module")
def low_server() -> Iterator[str]:
    """A second embedded PostgreSQL with max_connections 6 (3 usable by ordinary roles),
    and an ordinary role ``app_user``."""
    with embedded_server(max_connections=LOW_MAX_CONNECTIONS) as uri:
        with psycopg.connect(uri, autocommit=True) as admin:
            admin.execute("CREATE ROLE app_user LOGIN")
        yield uri


def fill_slots(conninfo: str) -> list[psycopg.Connection[Any]]:
    """Connect as *conninfo* until the server refuses; return the connections."""
    held: list[psycopg.Connection[Any]] = []
    for _ in range(LOW_MAX_CONNECTIONS + 1):
        try:
            held.append(psycopg.connect(conninfo, connect_timeout=5))
        except psycopg.OperationalError:
            return held
    raise AssertionError(f"the server accepted {len(held)} connections")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("role", "cause"),
    [("app_user", "remaining connection slots are reserved"),
     (None, "too many clients already")],
    ids=["ordinary-role", "superuser"],
)  # fmt: skip
def test_a_server_out_of_connection_slots_is_answered_503_and_warned_about(
    make_app: AppFactory,
    low_server: str,
    caplog: pytest.LogCaptureFixture,
    role: str | None,
    cause: str,
) -> None:
    user = {"user": role} if role else {}
    appname = pg.unique_name("refused")
    conninfo = pg.with_conninfo(low_server, application_name=appname, **user)
    app = with_views(make_app(conninfo=conninfo, timeout=0.5, max_size=4))
    reqconn = reqconn_of(app)
    with logs(caplog):
        # the first connection: 4 per worker cannot fit in 6 - 3 reserved
        assert app.test_client().get("/").status_code == 200
        (sizing,) = [r.getMessage() for r in caplog.records if r.name == "flask_reqconn.sizing"]
        assert "1 worker x REQCONN_MAX_SIZE 4 = 4 exceeds the 3 connections the server" in sizing
        assert "(max_connections 6 - 3 reserved)" in sizing
        caplog.clear()
        # the app holds its one connection; another client takes every other slot
        with reqconn.connection(app=app):
            others = fill_slots(pg.with_conninfo(low_server, **user))
            try:
                started = time.monotonic()
                answers = [get_refused(app) for _ in range(6)]
                ready = app.test_client().get("/_/ready")
                refusing = reqconn.stats(app)["pools"]["default"]["refusing"]
                burst = time.monotonic() - started
            finally:
                for conn in others:
                    conn.close()
        # the pool's next attempt gets a slot: the burst is over
        wait_until(lambda: reqconn.stats(app)["pools"]["default"]["refusing"] is None)
        assert app.test_client().get("/").status_code == 200
    for elapsed, response in answers:
        assert_refused_answer(response)
        assert elapsed < 1.5
    assert ready.status_code == 503
    assert ready.get_json()["reason"].startswith(f"{REFUSING}: ")
    assert cause in ready.get_json()["reason"]
    assert cause in refusing
    stats = reqconn.stats(app)
    assert (stats["refused"], stats["exhausted"]) == (6, 0)
    warnings = ours(caplog)
    assert len(warnings) == 1, warnings
    assert f"{REFUSING}: " in warnings[0] and cause in warnings[0]
    assert "lower REQCONN_MAX_SIZE" in warnings[0]
    attempts = [m for m in ours(caplog, logging.DEBUG) if "connection attempt of pool" in m]
    assert len(attempts) >= burst / 1.0, (burst, attempts)
    assert psycopg_attempt_lines(caplog) == []
    (again,) = [m for m in ours(caplog, logging.INFO) if "accepts connections again" in m]
    assert "6 requests answered 503" in again


@pytest.mark.slow
def test_a_server_whose_slots_hold_the_pool_is_not_warned_about(
    make_app: AppFactory, low_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = with_views(make_app(conninfo=low_server, max_size=3))
    with caplog.at_level(logging.DEBUG, logger="flask_reqconn.sizing"):
        for _ in range(3):
            assert app.test_client().get("/").status_code == 200
    assert [r for r in caplog.records if r.name == "flask_reqconn.sizing"] == []


@pytest.mark.slow
def test_gunicorn_workers_whose_pools_cannot_fit_are_warned_about_at_startup(
    spawn: Any, low_server: str
) -> None:
    """2 workers x MAX_SIZE 2 = 4 > 3 usable: each worker says so at its pool's first
    connection, naming --workers and the key to change."""
    env = {
        "RC_DSN": pg.with_conninfo(low_server, user="app_user"),
        "RC_APPNAME": pg.unique_name("sizing"),
        "RC_MAX_SIZE": "2",
        "RC_LOG": "WARNING",
    }
    server = spawn("gunicorn", "tests.apps.reqconn_app:create_app()", env=env, workers=2)
    for _ in range(6):
        status, _, body = servers.http_get(server.url + "/")
        assert status == 200, body
    lines = [line for line in server.log_text().splitlines()
             if line.startswith("WARNING flask_reqconn.sizing: ")]  # fmt: skip
    assert lines, server.log_text()
    assert all("2 workers x REQCONN_MAX_SIZE 2 = 4 exceeds the 3 connections" in line
               for line in lines), lines  # fmt: skip
    assert len(lines) <= 2  # once per worker process at most


def test_a_refusal_is_seen_with_psycopg_pool_s_logger_above_warning(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app = with_views(make_app(conninfo=f"host=127.0.0.1 port={closed_port()}", timeout=0.5))
    with (
        caplog.at_level(logging.ERROR, logger="psycopg.pool"),
        caplog.at_level(logging.DEBUG, logger="flask_reqconn"),
    ):
        _, response = get_refused(app)
    assert_refused_answer(response)
    assert "psycopg.pool" in reqconn_of(app).stats(app)["pools"]["default"]["refusing"]
    assert len(ours(caplog)) == 1
