"""Database faults: no dead connection reaches a view, a lost connection answers 503.

Real faults on real PostgreSQL: backends terminated on the server
(``pg_terminate_backend``, what ``idle_session_timeout``, a proxy restart or a
failover do) and a server restarted with ``-m immediate``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import psycopg
import pytest
from flask import Flask

from flask_reqconn import DatabaseUnavailable, get_conn, state_of
from flask_reqconn.liveness import (
    RECONNECT_JITTER,
    RECONNECT_MAX_DELAY,
    RequestPool,
    _CappedBackoff,
    server_gone,
)
from tests import pg
from tests.appfixtures import AppFactory
from tests.fix_faults import FaultServer


def _terminate(admin: psycopg.Connection[Any], appname: str, state: str) -> int:
    rows = admin.execute(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
        " WHERE application_name = %s AND state = %s AND pid <> pg_backend_pid()",
        (appname, state),
    ).fetchall()
    return sum(1 for (ok,) in rows if ok)


def _select1_app(make_app: AppFactory, **config: Any) -> Flask:
    app = make_app(**config)

    @app.get("/select1")
    def select1() -> str:
        return str(get_conn().execute("SELECT 1").fetchone())

    @app.get("/sleep")
    def sleep() -> str:
        get_conn().execute("SELECT pg_sleep(10)")
        return "slept"

    return app


def _warm(app: Flask, n: int) -> None:
    pool = state_of(app).pools["default"].pool
    pool.wait(timeout=30)
    assert pool.get_stats()["pool_available"] == n


def test_dead_idle_connections_never_reach_a_view(
    make_app: AppFactory, pg_admin: psycopg.Connection[Any]
) -> None:
    app = _select1_app(make_app, min_size=4, max_size=4)
    client = app.test_client()
    assert client.get("/select1").status_code == 200
    _warm(app, 4)
    assert _terminate(pg_admin, app.config["TEST_APPNAME"], "idle") == 4
    statuses = [client.get("/select1").status_code for _ in range(8)]
    assert statuses == [200] * 8
    stats = state_of(app).stats()
    assert stats["dead_discarded"] == 4
    assert stats["connection_lost"] == 0


def test_a_connection_lost_mid_request_answers_503_with_retry_after(
    make_app: AppFactory, pg_admin: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    app = _select1_app(make_app, retry_after=3)
    appname = app.config["TEST_APPNAME"]

    def kill_when_running() -> None:
        pg.wait_until(lambda: _terminate(pg_admin, appname, "active") > 0, timeout=20)

    killer = threading.Thread(target=kill_when_running)
    killer.start()
    with caplog.at_level(logging.WARNING, logger="flask_reqconn"):
        response = app.test_client().get("/sleep")
    killer.join()
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "3"
    lost = [r for r in caplog.records if "lost during GET /sleep: answered 503" in r.getMessage()]
    assert len(lost) == 1 and lost[0].name == "flask_reqconn.pool"
    assert not [r for r in caplog.records if r.exc_info]  # no traceback
    assert app.test_client().get("/select1").status_code == 200
    stats = state_of(app).stats()
    assert stats["connection_lost"] == 1 and stats["checked_out"] == 0


def test_other_operational_errors_are_not_turned_into_503(make_app: AppFactory) -> None:
    app = make_app()

    @app.get("/bad")
    def bad() -> str:
        get_conn().execute("SELECT 1/0")  # DataError, not lost
        return "no"

    @app.get("/locked")
    def locked() -> str:
        raise psycopg.OperationalError("not about the connection")

    app.config["PROPAGATE_EXCEPTIONS"] = False
    assert app.test_client().get("/bad").status_code == 500
    assert app.test_client().get("/locked").status_code == 500
    assert state_of(app).stats()["connection_lost"] == 0


def test_users_can_answer_a_lost_connection_their_way(
    make_app: AppFactory, pg_admin: psycopg.Connection[Any]
) -> None:
    app = _select1_app(make_app)

    @app.errorhandler(DatabaseUnavailable)
    def unavailable(exc: DatabaseUnavailable) -> tuple[dict[str, str], int]:
        return {"error": "database", "pool": exc.pool_name}, 503

    appname = app.config["TEST_APPNAME"]
    killer = threading.Thread(
        target=lambda: pg.wait_until(
            lambda: _terminate(pg_admin, appname, "active") > 0, timeout=20
        )
    )
    killer.start()
    response = app.test_client().get("/sleep")
    killer.join()
    assert response.status_code == 503
    assert response.json == {"error": "database", "pool": "default"}


def test_a_pending_notify_is_alive_a_terminated_backend_is_gone(
    pg_dsn: str, pg_admin: psycopg.Connection[Any]
) -> None:
    appname = pg.unique_name("live")
    with psycopg.connect(pg.with_conninfo(pg_dsn, application_name=appname),
                         autocommit=True) as conn:  # fmt: skip
        assert not server_gone(conn)
        conn.execute("LISTEN reqconn_live")
        pg_admin.execute("NOTIFY reqconn_live, 'hello'")
        time.sleep(0.2)
        assert not server_gone(conn)  # readable: a NotificationResponse, alive
        assert [n.payload for n in conn.notifies(timeout=1, stop_after=1)] == ["hello"]
        assert _terminate(pg_admin, appname, "idle") == 1
        pg.wait_until(lambda: server_gone(conn), timeout=10)
        assert not conn.closed  # nothing consumed: psycopg did not notice by itself


def test_reconnection_delays_are_capped_with_jitter() -> None:
    attempt = _CappedBackoff(timeout=300)
    delays = []
    now = time.monotonic()
    for i in range(12):  # psycopg_pool's own would reach 1 s * 2**11
        attempt.update_delay(now + i)
        delays.append(attempt.delay)
    cap = RECONNECT_MAX_DELAY * (1 + RECONNECT_JITTER)
    assert all(0 < d <= cap for d in delays)
    assert len({round(d, 6) for d in delays}) > 1  # jittered, not in lock step


def test_psycopg_pool_still_has_the_hook_the_capped_reconnect_uses() -> None:
    """RequestPool overrides a private method of psycopg_pool: fail loudly if it moves."""
    import inspect

    from psycopg_pool import ConnectionPool

    params = list(inspect.signature(ConnectionPool._add_connection).parameters)
    assert params[:3] == ["self", "attempt", "growing"]
    assert RequestPool._add_connection is not ConnectionPool._add_connection


def test_in_flight_requests_answer_503_through_an_immediate_restart_then_200(
    fault_pg: FaultServer,
) -> None:
    appname = pg.unique_name("restart")
    app = Flask(appname)
    app.config.update(
        REQCONN_CONNINFO=pg.with_conninfo(fault_pg.dsn, application_name=appname),
        REQCONN_MIN_SIZE=2,
        REQCONN_MAX_SIZE=2,
        REQCONN_TIMEOUT=5.0,
    )
    from flask_reqconn import ReqConn

    reqconn = ReqConn(app)

    @app.get("/sleep")
    def sleep() -> str:
        get_conn().execute("SELECT pg_sleep(10)")
        return "slept"

    @app.get("/select1")
    def select1() -> str:
        return str(get_conn().execute("SELECT 1").fetchone())

    try:
        client = app.test_client()
        assert client.get("/select1").status_code == 200
        statuses: list[int] = []
        worker = threading.Thread(target=lambda: statuses.append(client.get("/sleep").status_code))
        worker.start()
        with fault_pg.admin() as admin:
            pg.wait_until(
                lambda: admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                    " AND state = 'active'", (appname,)
                ).fetchone() == (1,),  # fmt: skip
                timeout=20,
            )
        fault_pg.restart("immediate")
        restarted = time.monotonic()
        worker.join(30)
        assert statuses == [503]
        while client.get("/select1").status_code != 200:
            assert time.monotonic() - restarted < 30, "the pool did not serve again"
        stats = reqconn.stats(app)
        assert stats["checked_out"] == 0
        assert stats["connection_lost"] == 1  # the idle one was discarded, not handed out
        assert stats["dead_discarded"] >= 1
    finally:
        reqconn.close(app)
