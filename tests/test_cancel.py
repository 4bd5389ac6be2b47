"""When the client leaves, its query stops: the watcher, under real gunicorn.

A view runs ``pg_sleep(30)``; the client disconnects after 0.3 s; soon after
(hang guards only; latency is measured in bench/) PostgreSQL shows no active
``pg_sleep`` of the app, the pool has the connection back, and the server
answers the next request.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from flask_reqconn import get_conn
from tests import pg, servers
from tests.appfixtures import AppFactory
from tests.test_gunicorn import APP, WORKERS, assert_recovered, stats

pytestmark = pytest.mark.slow


def start(spawn: Callable[..., servers.ServerProcess], pg_dsn: str, *, env: dict[str, str],
          **kind: Any) -> tuple[servers.ServerProcess, str]:  # fmt: skip
    appname = pg.unique_name("cancel")
    server = spawn(
        "gunicorn", APP, env={"RC_DSN": pg_dsn, "RC_APPNAME": appname, "RC_MAX_SIZE": "2",
                              **env}, **kind,
    )  # fmt: skip
    return server, appname


def request_bytes(method: str, path: str, *, keep_alive: bool = False) -> bytes:
    connection = "keep-alive" if keep_alive else "close"
    body = "Content-Length: 0\r\n" if method == "POST" else ""
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\n{body}Connection: {connection}\r\n\r\n"
            ).encode()  # fmt: skip


def sleeping(admin: Any, appname: str) -> list[dict[str, Any]]:
    return [s for s in pg.app_sessions(admin, appname)
            if s["state"] == "active" and "pg_sleep" in s["query"]]  # fmt: skip


def disconnect_after(server: servers.ServerProcess, method: str, path: str, seconds: float
                     ) -> None:  # fmt: skip
    sock = servers.raw_connect(server.url)
    try:
        sock.sendall(request_bytes(method, path))
        time.sleep(seconds)
    finally:
        sock.close()


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


GEVENT = pytest.param({"worker_class": "gevent", "extra_args": ("--worker-connections", "50")},
                      id="gevent")  # fmt: skip


# Every worker class with a GET under "safe"; a POST under "all" once, under gthread: the
# policy only arms the watcher (both cases in-process in test_policy.py,
# test_cancel_policy_by_method_view_and_blueprint), and an armed watcher's path under a
# worker class does not depend on the method (a POST without a body, as the GET). The
# POST-all runs under sync and gevent were dropped as duplicates of their GET-safe runs.
DEPARTED = [
    *[pytest.param(kind.values[0], "GET", "safe", id=f"{kind.id}-GET-safe")
      for kind in (*WORKERS, GEVENT)],
    pytest.param(WORKERS[1].values[0], "POST", "all", id=f"{WORKERS[1].id}-POST-all"),
]  # fmt: skip


@pytest.mark.tcp
@pytest.mark.parametrize(("kind", "method", "policy"), DEPARTED)
def test_departed_client_query_is_cancelled_and_connection_returned(
    spawn: Any, pg_dsn: str, pg_admin: Any, kind: dict[str, Any], method: str, policy: str
) -> None:
    server, appname = start(spawn, pg_dsn, env={"RC_CANCEL": policy}, **kind)
    disconnect_after(server, method, "/slow?s=30", 0.3)
    pg.wait_until(lambda: not sleeping(pg_admin, appname), timeout=15,
                  message="the pg_sleep(30) was cancelled")  # fmt: skip
    final = assert_recovered(server, pg_admin, appname)
    assert final["cancelled"] == 1
    assert final["client_gone"] == 1
    assert "Traceback" not in server.log_text()  # a 499, not a 500 with a stack


def test_client_gone_before_the_watcher_registered_it_is_still_seen(
    spawn: Any, pg_dsn: str, pg_admin: Any
) -> None:
    """Registration waits WATCH_DELAY; a client already gone by then is seen at once."""
    server, appname = start(spawn, pg_dsn, env={}, worker_class="gthread", threads=4)
    sock = servers.raw_connect(server.url)
    sock.sendall(request_bytes("GET", "/slow?s=30"))
    pg.wait_until(lambda: sleeping(pg_admin, appname), timeout=15, message="query running")
    sock.close()  # the query runs; the watcher may not have registered the client yet
    pg.wait_until(lambda: not sleeping(pg_admin, appname), timeout=15,
                  message="the pg_sleep(30) was cancelled")  # fmt: skip
    assert assert_recovered(server, pg_admin, appname)["cancelled"] == 1


@pytest.mark.parametrize(("method", "policy"), [("GET", "off"), ("POST", "safe")])
def test_no_cancellation_when_the_policy_says_so(
    spawn: Any, pg_dsn: str, pg_admin: Any, method: str, policy: str
) -> None:
    server, appname = start(spawn, pg_dsn, env={"RC_CANCEL": policy},
                            worker_class="gthread", threads=4)  # fmt: skip
    disconnect_after(server, method, "/slow?s=3", 0.3)
    # pg_sleep(3) cannot have finished one second after the disconnect
    time.sleep(1.0)
    assert sleeping(pg_admin, appname), "the query should still be running"
    final = assert_recovered(server, pg_admin, appname)
    assert final["cancelled"] == 0


def test_pipelined_keep_alive_request_is_not_cancelled(
    spawn: Any, pg_dsn: str, pg_admin: Any
) -> None:
    server, appname = start(spawn, pg_dsn, env={}, worker_class="gthread", threads=4)
    sock = servers.raw_connect(server.url, timeout=30)
    with sock:
        sock.sendall(request_bytes("GET", "/slow?s=1", keep_alive=True)
                     + request_bytes("GET", "/"))  # fmt: skip
        data = read_all(sock)
    assert data.count(b"HTTP/1.1 200") == 2, data[:500]
    assert stats(server)["cancelled"] == 0


@pytest.mark.parametrize(("eof_means_gone", "cancelled"), [("0", 0), ("1", 1)])
def test_half_closed_client_follows_the_eof_setting(
    spawn: Any, pg_dsn: str, pg_admin: Any, eof_means_gone: str, cancelled: int
) -> None:
    server, appname = start(spawn, pg_dsn, env={"RC_EOF_MEANS_GONE": eof_means_gone},
                            worker_class="gthread", threads=4)  # fmt: skip
    sock = servers.raw_connect(server.url, timeout=30)
    with sock:
        sock.sendall(request_bytes("GET", "/slow?s=1.5"))
        time.sleep(0.3)
        sock.shutdown(socket.SHUT_WR)  # done sending, still reading
        data = read_all(sock)
    if cancelled:
        assert not data.startswith(b"HTTP/1.1 200"), data[:200]
    else:
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
    final = assert_recovered(server, pg_admin, appname)
    assert final["cancelled"] == cancelled


def test_max_hold_cancels_and_replaces_the_connection(
    spawn: Any, pg_dsn: str, pg_admin: Any
) -> None:
    server, appname = start(spawn, pg_dsn, env={"RC_MAX_HOLD": "1"},
                            worker_class="gthread", threads=4)  # fmt: skip
    backend_before = servers.http_get(server.url + "/pid")[2]
    status, headers, _ = servers.http_get(server.url + "/slow?s=30", timeout=60)
    assert status == 503
    assert headers.get("retry-after") == "1", headers  # REQCONN_RETRY_AFTER's default
    final = assert_recovered(server, pg_admin, appname)
    assert final["reclaimed"] == 1
    assert final["pools"]["default"]["discarded_connections"] >= 1
    assert "REQCONN_MAX_HOLD (1.0 s) exceeded" in server.log_text()
    assert backend_before  # the server still serves with a fresh connection


def test_statement_timeout_is_not_mistaken_for_a_departed_client(
    make_app: AppFactory,
) -> None:
    app: Flask = make_app(session_settings={"statement_timeout": "100ms"})

    @app.get("/slow")
    def slow() -> str:
        get_conn().execute("select pg_sleep(2)")
        return "unreachable"

    assert app.test_client().get("/slow").status_code == 500


def test_max_hold_takes_back_a_connection_held_in_python(
    spawn: Any, pg_dsn: str, pg_admin: Any
) -> None:
    """Not a query: the view sleeps holding the only connection; the pool gets one back."""
    server, appname = start(spawn, pg_dsn, env={"RC_MAX_HOLD": "1", "RC_MAX_SIZE": "1",
                                                "RC_TIMEOUT": "2", "RC_CHECKOUT": "lazy"},
                            worker_class="gthread", threads=4)  # fmt: skip
    held: list[tuple[int, bytes]] = []
    holder = threading.Thread(
        target=lambda: held.append(servers.http_get(server.url + "/hold?s=20", timeout=60)[::2])
    )
    holder.start()
    try:
        began = time.monotonic()
        # the view holds the pool's only connection (its transaction open, in Python)
        # before the probes start: else a probe could take the connection first
        pg.wait_until(
            lambda: any(s["state"] == "idle in transaction"
                        for s in pg.app_sessions(pg_admin, appname)),
            timeout=20, interval=0.05, message="the view holding the connection",
        )  # fmt: skip
        # back in the pool within the limit plus SEVER_AFTER_CANCEL and a tick (about
        # 3.5 s), long before the view's 20 s sleep ends
        pg.wait_until(
            lambda: servers.http_get(server.url + "/", timeout=10)[0] == 200, timeout=30,
            message="the pool's only connection back while the view still sleeps",
        )  # fmt: skip
        assert time.monotonic() - began < 15
        assert not held  # the view is still sleeping: only its connection was taken back
    finally:
        # proven: end the view's 20 s sleep now, in its worker (lazy checkout: no connection)
        assert servers.http_get(server.url + "/hold/end", timeout=10)[0] == 200
        holder.join(60)
    assert held and held[0][0] == 200  # a view that never uses it again ends as it would
    final = assert_recovered(server, pg_admin, appname)
    assert final["reclaimed"] >= 1
    assert "opened another in its place" in server.log_text()


def test_max_hold_ends_a_stream_whose_client_stopped_reading(
    spawn: Any, pg_dsn: str, pg_admin: Any
) -> None:
    """The server blocks sending to a client that reads nothing: the stream is cut off."""
    server, appname = start(spawn, pg_dsn, env={"RC_MAX_HOLD": "1", "RC_MAX_SIZE": "1",
                                                "RC_TIMEOUT": "2"},
                            worker_class="gthread", threads=4)  # fmt: skip
    sock = servers.raw_connect(server.url, timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.sendall(request_bytes("GET", "/stream?n=5000&s=0"))
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # then it reads no more
        began = time.monotonic()
        pg.wait_until(
            lambda: stats(server)["checked_out"] == 0, timeout=30,
            message="the stream's connection taken back",
        )  # fmt: skip
        assert time.monotonic() - began < 20  # about 3.5 s; without the bound, never
        assert servers.http_get(server.url + "/", timeout=10)[0] == 200
    finally:
        sock.close()
    final = assert_recovered(server, pg_admin, appname)
    assert final["reclaimed"] >= 1
    assert "its stream was cut off (the client was not reading)" in server.log_text()
