"""Database faults: no dead connection reaches a view, a lost connection answers 503.

Real faults on real PostgreSQL: backends terminated on the server
(``pg_terminate_backend``, what ``idle_session_timeout``, a proxy restart or a
failover do), a server restarted with ``-m fast`` and ``-m immediate``, frozen
(SIGSTOP) with ``REQCONN_MAX_HOLD``, and a network path that drops every packet
silently (a network namespace; needs root), the last three under gunicorn.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from flask import Flask

from bench.faults import Clients, summarize
from flask_reqconn import DatabaseUnavailable, get_conn, state_of
from flask_reqconn.connection import server_gone
from flask_reqconn.pool import RECONNECT_JITTER, RECONNECT_MAX_DELAY, RequestPool, _CappedBackoff
from tests import pg, servers
from tests.appfixtures import AppFactory
from tests.fix_faults import FaultServer, RestartMode


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


@pytest.mark.slow
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


# -- under gunicorn: restart, freeze, silent drop ---------------------------------------------
#
# One gunicorn gthread worker (8 threads) serving tests/apps/faultapp.py (pool of 4,
# REQCONN_TIMEOUT = 2), 6 client threads looping on /select1 through the fault. The bounds
# are generous hang guards; the figures are bench/faults.py's (docs/failure-modes.rst).

_BOUND = 2.0 + 10.0  # REQCONN_TIMEOUT + the detection bound of the issue


@contextlib.contextmanager
def _served(
    spawn: Callable[..., servers.ServerProcess], server: FaultServer, **env: str
) -> Iterator[tuple[servers.ServerProcess, str]]:
    appname = pg.unique_name("gfault")
    proc = spawn(
        "gunicorn", "tests.apps.faultapp:create_app()", worker_class="gthread", workers=1,
        threads=8,
        env={"FAULT_VARIANT": "reqconn", "FAULT_DSN": server.dsn, "FAULT_APPNAME": appname,
             **env},
    )  # fmt: skip

    def full() -> bool:
        if servers.http_get(proc.url + "/select1", timeout=10)[0] != 200:
            return False
        stats = json.loads(servers.http_get(proc.url + "/stats", timeout=10)[2])
        return bool(stats["pools"]["default"]["pool"].get("pool_available", 0) >= 4)

    pg.wait_until(full, timeout=60, interval=0.2, message="pool of 4 ready")
    yield proc, appname


#: Seconds of answers kept after the first 200 that follows a fault (hundreds of requests
#: from 6 clients): every one of them must be a 200 (``errors_after_recovery``).
_AFTER_FIRST_200 = 1.5


def _through(
    url: str, fault: Callable[[], None], *, warmup: float = 1.0, recovery: float = 4.0
) -> dict[str, Any]:
    """The figures of 6 clients looping through *fault*: *warmup* s before it, and after
    it until *recovery* s have passed or :data:`_AFTER_FIRST_200` s after its first 200,
    whichever comes first (no 200 within *recovery* s: ``first_200_after_s`` is None)."""
    clients = Clients(url, 6, "/select1", timeout=30.0, max_requests=100_000)
    clients.start()
    try:
        time.sleep(warmup)
        started = time.monotonic()
        fault()
        ended = time.monotonic()
        deadline = ended + recovery
        while time.monotonic() < deadline and not any(
            r.status == "200" and r.end >= ended for r in list(clients.records)
        ):
            time.sleep(0.05)
        time.sleep(max(0.0, min(_AFTER_FIRST_200, deadline - time.monotonic())))
    finally:
        clients.stop()
    return summarize(clients.records, started, ended, 30.0)


def _stats(url: str) -> dict[str, Any]:
    return dict(json.loads(servers.http_get(url + "/stats", timeout=10)[2]))


def _assert_clear_answers(proc: servers.ServerProcess, figures: dict[str, Any]) -> None:
    statuses = figures["statuses"]
    assert set(statuses) <= {"200", "503"}, (figures, proc.log_tail())
    assert figures["hangs"] == 0, figures
    assert figures["first_200_after_s"] is not None, figures
    assert "Traceback" not in proc.log_text(), proc.log_tail()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_restart_under_gunicorn_answers_200_or_503_and_serves_again(
    fault_pg: FaultServer, spawn: Callable[..., servers.ServerProcess], mode: RestartMode
) -> None:
    with _served(spawn, fault_pg) as (proc, _appname):
        figures = _through(proc.url, lambda: fault_pg.restart(mode))
        _assert_clear_answers(proc, figures)
        assert figures["first_200_after_s"] < 5.0, figures
        assert figures["errors_after_recovery"] == 0, figures
        stats = _stats(proc.url)
        assert stats["checked_out"] == 0
        assert stats["pools"]["default"]["pool"]["connections_num"] > 4  # it reconnected


@pytest.mark.slow
def test_max_hold_ends_requests_on_a_frozen_server(
    fault_pg: FaultServer, spawn: Callable[..., servers.ServerProcess]
) -> None:
    """The cancel cannot reach a frozen server: the watcher shuts the sockets down. The
    freeze lasts longer than the bound, so requests waiting for the thaw would fail it."""
    with _served(spawn, fault_pg, FAULT_MAX_HOLD="2") as (proc, _appname):

        def freeze() -> None:
            with fault_pg.frozen():
                time.sleep(_BOUND + 2)

        figures = _through(proc.url, freeze)
        _assert_clear_answers(proc, figures)
        assert figures["longest_s"] <= _BOUND, figures
        assert figures["statuses"].get("503", 0) > 0, figures
        assert figures["first_200_after_s"] < 5.0, figures
        stats = _stats(proc.url)
        assert stats["reclaimed"] >= 1 and stats["checked_out"] == 0, stats
        assert "shut the connection's socket down" in proc.log_text()


@pytest.mark.slow
def test_a_silent_drop_is_bounded_by_the_tcp_defaults_and_recovers(
    netns_pg: FaultServer, spawn: Callable[..., servers.ServerProcess]
) -> None:
    """Every packet dropped for longer than the bound: without keepalives and
    tcp_user_timeout the requests holding connections would wait for the heal."""
    path = netns_pg.path
    assert path is not None
    with _served(spawn, netns_pg) as (proc, _appname):

        def drop() -> None:
            with path.dropping():
                time.sleep(_BOUND + 2)

        figures = _through(proc.url, drop, recovery=5.0)
        _assert_clear_answers(proc, figures)
        assert figures["longest_s"] <= _BOUND, figures
        assert figures["first_200_after_s"] < 5.0, figures
        assert _stats(proc.url)["checked_out"] == 0
