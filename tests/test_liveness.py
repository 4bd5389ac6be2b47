"""REQCONN_VALIDATE_IDLE, REQCONN_TCP_DEFAULTS, and a cancel that may still be in flight
never reaching the next borrower (pool.py, config.py, lease.py)."""

from __future__ import annotations

import contextvars
import os
import signal
import threading
import time
from typing import Any

import pytest
from flask import Flask

from flask_reqconn import ReqConn, connection, get_conn, state_of
from flask_reqconn.config import load_pool
from flask_reqconn.names import CancelReason
from flask_reqconn.netdefaults import TCP_DEFAULTS, uses_tcp
from tests import pg
from tests.appfixtures import AppFactory
from tests.fix_faults import FaultServer

# -- REQCONN_VALIDATE_IDLE ---------------------------------------------------------------------


def test_validate_idle_runs_a_query_on_connections_idle_that_long(
    make_app: AppFactory, pg_admin: Any
) -> None:
    app = make_app(min_size=1, max_size=1, validate_idle=0.3)

    @app.get("/select")
    def select() -> str:
        get_conn().execute("SELECT 'view'")
        return "ok"

    @app.get("/noop")
    def noop() -> str:  # eager checkout: the connection is checked out, never used
        return "ok"

    def last_query() -> str:
        row = pg_admin.execute(
            "SELECT query FROM pg_stat_activity WHERE application_name = %s",
            (app.config["TEST_APPNAME"],),
        ).fetchone()
        return str(row[0]) if row else "<none>"

    client = app.test_client()
    assert client.get("/select").status_code == 200
    assert client.get("/noop").status_code == 200  # idle < 0.3 s: no validation query
    assert last_query().startswith(connection._WRITE_CHECK)  # the hand-back's
    time.sleep(0.5)
    assert client.get("/noop").status_code == 200  # idle > 0.3 s: validated
    # psycopg_pool's check_connection(): an empty statement (3.2.3 and later; SELECT 1 before)
    assert last_query() in ("", "SELECT 1")
    assert app.extensions["test_reqconn"].stats(app)["dead_discarded"] == 0


def test_validate_idle_config_accepts_none_and_zero_and_rejects_negative() -> None:
    base = {"REQCONN_CONNINFO": "dbname=x"}
    assert load_pool(base, "a").validate_idle is None
    assert load_pool({**base, "REQCONN_VALIDATE_IDLE": 0}, "a").validate_idle == 0.0
    with pytest.raises(Exception, match="REQCONN_VALIDATE_IDLE"):
        load_pool({**base, "REQCONN_VALIDATE_IDLE": -1}, "a")


# -- cancel hygiene: a cancel that may still be in flight -------------------------------------


@pytest.mark.slow
def test_an_uncertain_cancel_never_reaches_the_next_borrower(fault_pg: FaultServer) -> None:
    """The postmaster is stopped: the cancel request is accepted by the kernel and queued,
    cancel_safe() times out, and the cancel is delivered once the postmaster resumes. The
    connection it was meant for must not be reused by then."""
    app = Flask("uncertain")
    app.config.update(
        REQCONN_CONNINFO=fault_pg.dsn, REQCONN_MIN_SIZE=2, REQCONN_MAX_SIZE=2,
        REQCONN_TIMEOUT=20, REQCONN_CONNECT_ARGS={"application_name": "uncertain"},
    )  # fmt: skip
    ext = ReqConn(app)
    holder = state_of(app).pools["default"]
    try:
        pg.wait_until(
            lambda: holder.pool.get_stats()["pool_available"] == 2, timeout=30,
            message="pool of 2 ready",
        )  # fmt: skip
        postmaster = fault_pg.postmaster_pid
        assert postmaster is not None
        with app.test_request_context("/"):
            conn = get_conn()
            first_pid = conn.info.backend_pid
            lease = holder.counters.active_leases()[0]
            done: list[BaseException | None] = []

            def query() -> None:
                try:
                    conn.execute("SELECT pg_sleep(1)")
                    done.append(None)
                except BaseException as exc:  # noqa: B036 - checked below
                    done.append(exc)

            # the request's context: the connection is the request's to use
            runner = threading.Thread(target=contextvars.copy_context().run, args=(query,))
            runner.start()
            time.sleep(0.2)
            os.kill(postmaster, signal.SIGSTOP)
            try:
                assert lease.cancel(CancelReason.CLIENT_GONE, 0.5) is False
                assert lease.cancel_uncertain
                runner.join(10)
                assert done == [None]  # the backend ran on; the cancel did not arrive
            except BaseException:
                os.kill(postmaster, signal.SIGCONT)
                raise
        # released (teardown): the connection whose cancel is queued must be gone
        results: list[Any] = []

        def borrower() -> None:
            with app.test_request_context("/"):
                c = get_conn()
                try:
                    c.execute("SELECT pg_sleep(1.5)")
                    results.append(c.info.backend_pid)
                except BaseException as exc:  # noqa: B036 - checked below
                    results.append(exc)

        borrowers = [threading.Thread(target=borrower) for _ in range(2)]
        for b in borrowers:
            b.start()
        time.sleep(0.3)  # one borrower runs its query, the other waits for a new connection
        os.kill(postmaster, signal.SIGCONT)  # the queued cancel is delivered now
        for b in borrowers:
            b.join(30)
        assert len(results) == 2 and all(isinstance(r, int) for r in results), results
        assert first_pid not in results
        assert ext.stats(app)["discarded_connections"] >= 1
    finally:
        ext.close(app)


@pytest.mark.slow
def test_max_hold_severs_a_hand_back_blocked_on_a_frozen_server(fault_pg: FaultServer) -> None:
    """The view ended, then the server froze: teardown's ROLLBACK waits for an answer that
    will not come before the thaw. REQCONN_MAX_HOLD bounds that wait too: the watcher shuts
    the socket down, the connection is discarded, never returned with a dead socket."""
    app = Flask("frozen_handback")
    app.config.update(
        REQCONN_CONNINFO=fault_pg.dsn, REQCONN_MIN_SIZE=1, REQCONN_MAX_SIZE=1,
        REQCONN_TIMEOUT=20, REQCONN_MAX_HOLD=1,
        REQCONN_CONNECT_ARGS={"application_name": "frozen_handback"},
    )  # fmt: skip
    ext = ReqConn(app)
    holder = state_of(app).pools["default"]
    freeze_for = 15.0
    try:
        pg.wait_until(
            lambda: holder.pool.get_stats()["pool_available"] == 1, timeout=30,
            message="pool of 1 ready",
        )  # fmt: skip
        in_view = threading.Event()
        frozen = threading.Event()
        ended: list[float] = []
        pids: list[int] = []

        def request() -> None:
            with app.test_request_context("/"):
                conn = get_conn()
                pids.append(conn.info.backend_pid)
                conn.execute("SELECT 1")  # a transaction is open: the hand-back rolls back
                in_view.set()
                frozen.wait(30)
            ended.append(time.monotonic())  # teardown (the hand-back) has returned

        runner = threading.Thread(target=request)
        runner.start()
        assert in_view.wait(30)
        with fault_pg.frozen():
            started = time.monotonic()
            frozen.set()
            runner.join(freeze_for)
            waited = time.monotonic() - started
        runner.join(30)
        assert ended, "the request never ended"
        # limit 1 s + the watcher's tick + the 2 s a hand-back is given; a freeze of 15 s
        assert ended[0] - started < 10.0, f"hand-back waited {ended[0] - started:.1f} s"
        assert waited < freeze_for
        stats = ext.stats(app)
        assert stats["reclaimed"] >= 1 and stats["discarded_connections"] >= 1, stats
        assert stats["checked_out"] == 0
        with app.test_request_context("/"):
            conn = get_conn()
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert conn.info.backend_pid != pids[0]  # a new connection, not the severed one
    finally:
        ext.close(app)


# -- TCP defaults --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conninfo", "tcp"),
    [
        ("host=db.example", True),
        ("postgresql://u@10.0.0.1/x", True),
        ("hostaddr=10.0.0.1", True),
        ("host=/run/postgresql,db2 target_session_attrs=read-write", True),
        ("host=/run/postgresql", False),
        ("host=@abstract", False),
        ("dbname=x", False),
        ("postgresql:///x", False),
    ],
)
def test_tcp_hosts_are_told_from_unix_sockets(conninfo: str, tcp: bool) -> None:
    assert uses_tcp(conninfo) is tcp
    settings = load_pool({"REQCONN_CONNINFO": conninfo}, "a")
    assert dict(settings.tcp_defaults) == (TCP_DEFAULTS if tcp else {})
    for key, value in settings.tcp_defaults.items():
        assert settings.connect_args[key] == value


def test_tcp_defaults_give_way_to_the_users_settings() -> None:
    s = load_pool(
        {"REQCONN_CONNINFO": "host=db keepalives_idle=30",
         "REQCONN_CONNECT_ARGS": {"tcp_user_timeout": 30000}}, "a",
    )  # fmt: skip
    assert "keepalives_idle" not in s.connect_args
    assert s.connect_args["tcp_user_timeout"] == 30000
    assert s.connect_args["connect_timeout"] == TCP_DEFAULTS["connect_timeout"]
    off = load_pool({"REQCONN_CONNINFO": "host=db", "REQCONN_TCP_DEFAULTS": False}, "a")
    assert not set(TCP_DEFAULTS) & set(off.connect_args)
    named = load_pool(
        {"REQCONN_CONNINFO": "host=/tmp", "REQCONN_CONNECT_ARGS": {"host": "db"}}, "a"
    )
    assert named.tcp_defaults


@pytest.mark.slow
def test_tcp_defaults_reach_the_connection(fault_pg: FaultServer) -> None:
    app = Flask("tcpdefaults")
    app.config.update(REQCONN_CONNINFO=fault_pg.dsn, REQCONN_MIN_SIZE=0)
    ext = ReqConn(app)
    try:
        with state_of(app).pools["default"].connection() as conn:
            params = conn.info.get_parameters()
            dsn = conn.info.dsn
        assert "keepalives_idle=5" in dsn and "tcp_user_timeout=8000" in dsn, dsn
        assert params["application_name"] == "tcpdefaults"
    finally:
        ext.close(app)


def test_the_psycopg_pool_internals_the_request_pool_builds_on_have_their_shape() -> None:
    """``pool.RequestPool`` overrides or calls these psycopg_pool internals. If a
    release changes one, the pool could stop replacing the connections flask-reqconn
    discards (it would shrink until every request hangs): fail here first, before the
    upper bound on psycopg-pool in pyproject.toml is raised."""
    import inspect

    from psycopg_pool import ConnectionPool
    from psycopg_pool.base import AttemptWithBackoff, BasePool
    from psycopg_pool.pool import AddConnection

    def fits(fn: Any, *args: Any, **kwargs: Any) -> bool:
        """*fn* takes the arguments the way pool.py passes them."""
        inspect.signature(fn).bind(*args, **kwargs)  # TypeError if not
        return True

    assert fits(ConnectionPool._add_connection, "self", None, False)
    assert fits(AddConnection, "pool")
    assert fits(AttemptWithBackoff, timeout=10.0)
    assert fits(AttemptWithBackoff.update_delay, "self", 1.0)
    assert fits(BasePool._jitter, 0.5, -0.2, 0.2)
    assert fits(BasePool._check_pool_putconn, "self", "conn")
    assert fits(ConnectionPool.run_task, "self", "task")
    attempt = AttemptWithBackoff(timeout=10.0)
    attempt.update_delay(time.monotonic())
    assert isinstance(attempt.delay, float)
    assert 0.4 <= BasePool._jitter(0.5, -0.2, 0.2) <= 0.6
    pool: ConnectionPool[Any] = ConnectionPool("", open=False)
    pool._stats[BasePool._RETURNS_BAD] += 1  # what RequestPool.putconn counts
    assert pool.get_stats()["returns_bad"] == 1
