"""A lost database connection gets a clear answer (:mod:`flask_reqconn.lost`).

Real faults: the request's backend is terminated (``pg_terminate_backend``) while its
query runs. A streamed body that has sent nothing answers 503 with ``Retry-After``
(through the app's handler for ``DatabaseUnavailable``), one that has sent a chunk is cut
off without a traceback, both under real gunicorn (sync and gthread). An outage burst logs
one WARNING of ours and none of psycopg_pool's per connection. The SQLAlchemy side is in
tests/test_sqlalchemy_flask.py.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from flask import Response, stream_with_context
from psycopg_pool import ConnectionPool

from flask_reqconn import get_conn, state_of
from flask_reqconn.lost import is_lost
from flask_reqconn.pool import RequestPool
from tests import pg, servers
from tests.appfixtures import AppFactory

_WORKERS = {"sync": {"worker_class": "sync"}, "gthread": {"worker_class": "gthread", "threads": 4}}


#: Backends of an app running a query: not the BEGIN psycopg sends on its own before the
#: first statement of a transaction, which is over before a terminate could reach it.
_RUNNING = "application_name = %s AND state = 'active' AND query NOT LIKE 'BEGIN%%'"


def _terminate_active(admin: psycopg.Connection[Any], appname: str, n: int = 1) -> None:
    """Wait until *n* backends of *appname* run a query, then terminate them."""

    def active() -> bool:
        (count,) = admin.execute(
            f"SELECT count(*) FROM pg_stat_activity WHERE {_RUNNING}", (appname,)
        ).fetchone() or (0,)
        return bool(count >= n)

    pg.wait_until(active, timeout=30, message=f"{n} active backends of {appname}")
    admin.execute(
        f"SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE {_RUNNING}",
        (appname,),
    )


def _killing(admin: psycopg.Connection[Any], appname: str, n: int = 1) -> threading.Thread:
    killer = threading.Thread(target=_terminate_active, args=(admin, appname, n), daemon=True)
    killer.start()
    return killer


def _raw_get(url: str, path: str, timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    """GET *path*; (status, lower-cased headers, the raw body as sent, chunk framing kept),
    read until the server closes the connection."""
    sock = servers.raw_connect(url, timeout)
    with sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            raw += data
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        assert name.strip().lower() not in headers, f"header sent twice: {head!r}"
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def _serve(spawn: Callable[..., servers.ServerProcess], pg_dsn: str, worker: str
           ) -> tuple[servers.ServerProcess, str]:  # fmt: skip
    appname = pg.unique_name("outage")
    proc = spawn(
        "gunicorn", "tests.apps.outage_app:create_app()", workers=1, **_WORKERS[worker],
        env={"OUTAGE_DSN": pg_dsn, "OUTAGE_APPNAME": appname},
    )  # fmt: skip
    assert servers.http_get(proc.url + "/select1", timeout=30)[0] == 200
    return proc, appname


def _get_while_killing(
    proc: servers.ServerProcess, admin: psycopg.Connection[Any], appname: str, path: str
) -> tuple[int, dict[str, str], bytes]:
    """GET *path* while its backend is terminated as soon as it runs a query."""
    killer = _killing(admin, appname)
    try:
        return _raw_get(proc.url, path)
    finally:
        killer.join()


def _assert_quiet_log(proc: servers.ServerProcess) -> str:
    """No traceback, no server error, no psycopg_pool WARNING per connection; the log."""
    log = proc.log_text()
    assert "Traceback" not in log and "Error handling request" not in log, proc.log_tail()
    assert "discarding closed connection" not in log, proc.log_tail()
    return log


def _stats(proc: servers.ServerProcess) -> dict[str, Any]:
    return dict(json.loads(servers.http_get(proc.url + "/stats", timeout=30)[2]))


@pytest.mark.slow
@pytest.mark.tcp
@pytest.mark.parametrize("worker", sorted(_WORKERS))
def test_a_stream_lost_before_its_first_chunk_answers_503_under_gunicorn(
    pg_dsn: str,
    pg_admin: psycopg.Connection[Any],
    spawn: Callable[..., servers.ServerProcess],
    worker: str,
) -> None:
    proc, appname = _serve(spawn, pg_dsn, worker)
    status, headers, body = _get_while_killing(proc, pg_admin, appname, "/first")
    assert status == 503, (body, proc.log_tail())
    assert headers["retry-after"] == "7"
    assert headers["content-type"].startswith("text/html")  # the 503's, not the stream's
    assert b"lost its database connection" in body
    assert "x-handled" not in headers
    # the blueprint's own handler for DatabaseUnavailable answers its stream
    time.sleep(1.1)  # past the WARNING's rate limit: this one is logged too
    status, headers, body = _get_while_killing(proc, pg_admin, appname, "/bp/first")
    assert status == 503, (body, proc.log_tail())
    assert headers["x-handled"] == "1" and headers["content-type"] == "application/json"
    assert json.loads(body) == {"error": "database", "pool": "default"}
    # the connection is back: the next request is served
    assert servers.http_get(proc.url + "/select1", timeout=30)[0] == 200
    stats = _stats(proc)
    assert stats["connection_lost"] == 2 and stats["checked_out"] == 0, stats
    assert stats["releases"]["exception"] == 2, stats
    assert stats["pools"]["default"]["pool"]["returns_bad"] == 2, stats  # returned once each
    log = _assert_quiet_log(proc)
    assert log.count("lost during GET /first: answered 503") == 1, proc.log_tail()
    assert log.count("lost during GET /bp/first: answered 503") == 1, proc.log_tail()


@pytest.mark.slow
@pytest.mark.tcp
@pytest.mark.parametrize("worker", sorted(_WORKERS))
def test_a_stream_lost_after_its_first_chunk_is_cut_off_quietly_under_gunicorn(
    pg_dsn: str,
    pg_admin: psycopg.Connection[Any],
    spawn: Callable[..., servers.ServerProcess],
    worker: str,
) -> None:
    proc, appname = _serve(spawn, pg_dsn, worker)
    status, headers, body = _get_while_killing(proc, pg_admin, appname, "/late")
    assert status == 200 and headers["transfer-encoding"] == "chunked", (headers, body)
    assert b"first chunk" in body
    assert not body.endswith(b"0\r\n\r\n"), body  # no last chunk: the client sees a cut
    assert b"never" not in body
    assert servers.http_get(proc.url + "/select1", timeout=30)[0] == 200
    stats = _stats(proc)
    assert stats["connection_lost"] == 1 and stats["checked_out"] == 0, stats
    assert stats["releases"]["exception"] == 1, stats
    assert stats["discarded_connections"] == 1, stats
    assert stats["pools"]["default"]["pool"]["returns_bad"] == 1, stats  # returned once
    log = _assert_quiet_log(proc)
    assert log.count("lost during GET /late: its streamed response was cut off") == 1, log


def test_an_outage_burst_logs_one_warning_and_none_of_psycopg_pools(
    make_app: AppFactory, pg_admin: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """4 requests lose their connection at once, then 4 idle connections are found dead:
    one WARNING of ours for the burst, no ``discarding closed connection`` per connection
    (what psycopg_pool logs for every closed connection given back)."""
    app = make_app(min_size=4, max_size=4)
    appname = app.config["TEST_APPNAME"]

    @app.get("/sleep")
    def sleep() -> str:
        get_conn().execute("SELECT pg_sleep(30)")
        return "slept"

    @app.get("/select1")
    def select1() -> str:
        return str(get_conn().execute("SELECT 1").fetchone())

    pool = state_of(app).pools["default"].pool
    assert isinstance(pool, RequestPool)
    with (
        caplog.at_level(logging.INFO, logger="psycopg.pool"),
        caplog.at_level(logging.WARNING, logger="flask_reqconn"),
    ):
        with ThreadPoolExecutor(4) as ex:
            futures = [ex.submit(lambda: app.test_client().get("/sleep")) for _ in range(4)]
            _terminate_active(pg_admin, appname, 4)
            statuses = [f.result(60).status_code for f in futures]
        assert statuses == [503] * 4
        pool.wait(timeout=30)
        pg.wait_until(lambda: pool.get_stats()["pool_available"] == 4, timeout=30)
        rows = pg_admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
            " WHERE application_name = %s AND state = 'idle'",
            (appname,),
        ).fetchall()
        assert len(rows) == 4
        time.sleep(0.3)
        assert [app.test_client().get("/select1").status_code for _ in range(6)] == [200] * 6
    ours = [r for r in caplog.records if r.name.startswith("flask_reqconn")]
    assert len(ours) == 1, [r.getMessage() for r in ours]
    assert "lost during GET /sleep: answered 503" in ours[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info]
    noisy = [r for r in caplog.records if r.name == "psycopg.pool" and r.levelno >= logging.WARNING]
    assert noisy == [], [r.getMessage() for r in noisy]
    stats = state_of(app).stats()
    assert stats["connection_lost"] == 4 and stats["dead_discarded"] == 4, stats
    assert stats["pools"]["default"]["pool"]["returns_bad"] == 8, stats


def test_psycopg_pool_warns_for_each_closed_connection_ours_does_not(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the line comes from (psycopg_pool's putconn of a closed connection), and that
    RequestPool still replaces such a connection, and refuses it a second time."""
    for cls in (ConnectionPool, RequestPool):
        caplog.clear()
        with cls(pg_dsn, min_size=1, max_size=1, open=True) as pool:
            pool.wait(timeout=30)
            conn = pool.getconn()
            conn.close()
            with caplog.at_level(logging.WARNING, logger="psycopg.pool"):
                pool.putconn(conn)
            warned = "discarding closed connection" in caplog.text
            assert warned is (cls is ConnectionPool), caplog.text
            with pool.connection(timeout=30) as fresh:  # replaced
                assert fresh is not conn and fresh.execute("SELECT 1").fetchone() == (1,)
            if cls is RequestPool:
                with pytest.raises(ValueError, match="doesn't come from any pool"):
                    pool.putconn(conn)
            assert pool.get_stats()["returns_bad"] == 1


def test_what_counts_as_a_lost_connection(pg_dsn: str, pg_admin: psycopg.Connection[Any]) -> None:
    appname = pg.unique_name("lost")
    with psycopg.connect(pg.with_conninfo(pg_dsn, application_name=appname)) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero) as div:
            conn.execute("SELECT 1/0")
        assert not is_lost(div.value, conn)
        conn.rollback()
        with pytest.raises(psycopg.errors.QueryCanceled) as canceled:
            conn.execute("SET statement_timeout = 50; SELECT pg_sleep(5)")
        assert not is_lost(canceled.value, conn)  # 57014: an OperationalError, not lost
        conn.rollback()
        killer = _killing(pg_admin, appname)
        with pytest.raises(psycopg.OperationalError) as lost:
            conn.execute("SELECT pg_sleep(30)")
        killer.join()
        assert lost.value.sqlstate == "57P01" and conn.closed
        assert is_lost(lost.value, conn) and is_lost(lost.value)
    assert not is_lost(psycopg.OperationalError("no sqlstate, connection unknown"))
    assert not is_lost(TimeoutError())


def test_a_stream_lost_before_its_first_chunk_answers_503_in_the_test_client(
    make_app: AppFactory, pg_admin: psycopg.Connection[Any]
) -> None:
    """The status line of a streamed body waits for its first chunk, so even Flask's test
    client (whose start_response refuses a second call) gets the 503."""
    app = make_app(retry_after=4)

    @app.get("/first")
    def first() -> Response:
        def body() -> Iterator[str]:
            get_conn().execute("SELECT pg_sleep(30)")
            yield "never\n"

        return Response(stream_with_context(body()), mimetype="text/plain")

    @app.get("/empty")
    def empty() -> Response:
        get_conn()

        def body() -> Iterator[str]:
            yield from ()

        return Response(stream_with_context(body()), headers={"X-Empty": "1"})

    client = app.test_client()
    killer = _killing(pg_admin, app.config["TEST_APPNAME"])
    with client.get("/first") as response:
        killer.join()
        assert response.status_code == 503 and response.headers["Retry-After"] == "4"
        assert response.mimetype == "text/html"
    with client.get("/empty") as nothing:  # an empty stream still sends its status line
        assert nothing.status_code == 200 and nothing.headers["X-Empty"] == "1"
        assert nothing.data == b""
    stats = state_of(app).stats()
    assert stats["connection_lost"] == 1 and stats["checked_out"] == 0, stats


def test_connections_lost_before_their_hand_back_log_one_warning(
    make_app: AppFactory, pg_admin: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The view answered, then its backend died (the hand-back's ROLLBACK finds it gone):
    the response stands, the connection is replaced, and a burst of those is one WARNING,
    not one "could not clean" WARNING per connection."""
    app = make_app(min_size=2, max_size=2)

    @app.get("/dies")
    def dies() -> str:
        conn = get_conn()
        pid = conn.info.backend_pid
        conn.execute("SELECT 1")  # a transaction is open: the hand-back has to roll it back
        pg_admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
        pg.wait_until(
            lambda: not pg_admin.execute(
                "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone(),
            timeout=10, message=f"backend {pid} gone",
        )  # fmt: skip
        return str(pid)

    @app.get("/select1")
    def select1() -> str:
        return str(get_conn().execute("SELECT 1").fetchone())

    with caplog.at_level(logging.WARNING, logger="flask_reqconn"):
        assert [app.test_client().get("/dies").status_code for _ in range(3)] == [200] * 3
        assert app.test_client().get("/select1").status_code == 200
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("flask_reqconn")]
    assert len(ours) == 1, ours
    assert "lost during GET /dies: found at its hand-back, replaced" in ours[0], ours
    stats = state_of(app).stats()
    assert stats["discarded_connections"] == 3 and stats["checked_out"] == 0, stats
