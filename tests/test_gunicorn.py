"""End to end under real gunicorn: real sockets that really disconnect.

After every storm: zero connections checked out by the pool, zero non-idle
sessions of the app in ``pg_stat_activity``, and a normal request answers 200.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests import pg, servers

pytestmark = pytest.mark.slow

APP = "tests.apps.reqconn_app:create_app()"


def get_json(server: servers.ServerProcess, path: str) -> Any:
    status, _, body = servers.http_get(server.url + path)
    assert status == 200, (status, body[:300])
    return json.loads(body)


def stats(server: servers.ServerProcess) -> dict[str, Any]:
    return get_json(server, "/_stats")  # type: ignore[no-any-return]


def start(
    spawn: Callable[..., servers.ServerProcess],
    pg_dsn: str,
    *,
    worker_class: str = "sync",
    workers: int = 1,
    threads: int = 1,
    max_size: int = 2,
    timeout: float = 5,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    graceful_timeout: float = 5,
) -> tuple[servers.ServerProcess, str]:
    appname = pg.unique_name("e2e")
    server = spawn(
        "gunicorn",
        APP,
        worker_class=worker_class,
        workers=workers,
        threads=threads,
        graceful_timeout=graceful_timeout,
        extra_args=extra_args,
        env={
            "RC_DSN": pg_dsn,
            "RC_APPNAME": appname,
            "RC_MAX_SIZE": str(max_size),
            "RC_TIMEOUT": str(timeout),
            **(env or {}),
        },
    )
    return server, appname


def assert_recovered(server: servers.ServerProcess, admin: Any, appname: str) -> dict[str, Any]:
    """No lease checked out, no busy session, and the server still answers."""
    final = pg.wait_until(
        lambda: (s := stats(server))["checked_out"] == 0 and s,
        timeout=60,
        message="every lease released",
    )
    pg.wait_until(
        lambda: all(s["state"] == "idle" for s in pg.app_sessions(admin, appname)),
        timeout=60,
        message="no non-idle sessions of the app",
    )
    status, _, body = servers.http_get(server.url + "/")
    assert (status, body) == (200, b"1")
    return final  # type: ignore[no-any-return]


def in_threads(n: int, fn: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            fn(i)
        except BaseException as exc:  # noqa: B036 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not any(th.is_alive() for th in threads), "client threads hung"
    assert not errors, errors[:3]


WORKERS = [
    pytest.param({"worker_class": "sync"}, id="sync"),
    pytest.param({"worker_class": "gthread", "threads": 8}, id="gthread-8-threads"),
]


@pytest.mark.tcp
@pytest.mark.parametrize("kind", WORKERS)
def test_clients_that_abort_while_the_pool_is_saturated(
    spawn: Any, pg_dsn: str, pg_admin: Any, kind: dict[str, Any]
) -> None:
    # sync serves one request at a time: one busy request fills its worker
    busy = 2 if kind.get("threads", 1) > 1 else 1
    server, appname = start(spawn, pg_dsn, max_size=busy, timeout=5, **kind)
    # hold every connection, then pile up requests whose clients leave at once
    holders = [threading.Thread(target=servers.http_get, args=(server.url + "/slow?s=1.5",))
               for _ in range(busy)]
    for th in holders:
        th.start()
    pg.wait_until(lambda: len([s for s in pg.app_sessions(pg_admin, appname)
                               if "pg_sleep" in s["query"] and s["state"] == "active"]) == busy,
                  message="every connection busy")
    aborted = 40
    ways = ["close", "rst", "after_ms"]
    in_threads(aborted, lambda i: servers.send_and_close(
        server.url, "/slow?s=0.5", how=ways[i % 3], ms=1))
    for th in holders:
        th.join(60)
    final = assert_recovered(server, pg_admin, appname)
    print("abort storm", kind, {k: final[k] for k in ("client_gone", "exhausted", "releases")})
    # each aborted request was skipped, never ran its 0.5 s query
    assert final["client_gone"] + final["exhausted"] >= aborted // 2
    assert final["releases"]["teardown"] >= busy


@pytest.mark.tcp
def test_client_leaving_while_waiting_for_the_pool_is_released_right_after_checkout(
    spawn: Any, pg_dsn: str, pg_admin: Any
) -> None:
    """The original bug: clients gone during the pool wait. Released at once, view skipped."""
    server, appname = start(spawn, pg_dsn, worker_class="gthread", threads=8,
                            max_size=1, timeout=30)
    holder = threading.Thread(target=servers.http_get, args=(server.url + "/slow?s=3",))
    holder.start()
    pg.wait_until(lambda: [s for s in pg.app_sessions(pg_admin, appname)
                           if s["state"] == "active"], message="the one connection busy")
    waiting = 6
    # these are read by the server and start waiting for the pool, then leave
    in_threads(waiting, lambda i: servers.send_and_close(
        server.url, "/slow?s=5", how="after_ms", ms=300))
    holder.join(60)
    # every waiter is handled (they wake one by one as the connection comes back)
    pg.wait_until(lambda: stats(server)["client_gone"] == waiting, timeout=60,
                  message="every departed waiter answered 499")
    final = assert_recovered(server, pg_admin, appname)
    print("left while waiting", {k: final[k] for k in ("client_gone", "releases")})
    assert final["client_gone"] == waiting
    assert final["releases"]["client_gone"] >= 1  # seen right after the checkout
    assert final["releases"]["teardown"] == 1  # the holder


@pytest.mark.tcp
@pytest.mark.parametrize("kind", WORKERS)
def test_clients_that_drop_a_stream_after_the_first_chunk(
    spawn: Any, pg_dsn: str, pg_admin: Any, kind: dict[str, Any]
) -> None:
    server, appname = start(spawn, pg_dsn, max_size=2, timeout=20, **kind)
    drops = 12
    in_threads(4, lambda i: [servers.read_first_chunk_and_drop(
        server.url, "/stream?n=30&s=0.05", how="rst" if (i + j) % 2 else "close")
        for j in range(drops // 4)])
    final = assert_recovered(server, pg_admin, appname)
    print("stream drops", kind, {k: final[k] for k in ("checkouts", "releases")})
    assert final["releases"]["abort"] == drops
    assert final["checkouts"] >= drops


def test_burst_into_small_pool_answers_503_fast_under_gthread(
    spawn: Any, pg_dsn: str, pg_admin: Any
) -> None:
    server, appname = start(spawn, pg_dsn, worker_class="gthread", threads=20,
                            max_size=2, timeout=0.5)
    results: list[tuple[int, dict[str, str]]] = []
    lock = threading.Lock()

    def one(_: int) -> None:
        status, headers, _ = servers.http_get(server.url + "/slow?s=1.5", timeout=60)
        with lock:
            results.append((status, headers))

    in_threads(20, one)
    codes = sorted(code for code, _ in results)
    assert set(codes) <= {200, 503}
    assert codes.count(503) >= 10
    assert all(h.get("retry-after") == "1" for code, h in results if code == 503)
    final = assert_recovered(server, pg_admin, appname)
    pool = final["pools"]["default"]["pool"]
    assert pool["pool_available"] == pool["pool_size"] <= 2


def test_preload_opens_no_pool_in_the_master(spawn: Any, pg_dsn: str, pg_admin: Any) -> None:
    server, appname = start(spawn, pg_dsn, workers=2, extra_args=("--preload",))
    assert pg.app_sessions(pg_admin, appname) == []  # nothing connected before a request
    seen: dict[int, int] = {}

    def hit(_: int) -> None:
        for _ in range(10):
            data = get_json(server, "/pid")
            seen[data["worker"]] = data["backend"]

    in_threads(4, hit)
    assert server.pid not in seen
    assert set(seen) <= set(server.worker_pids())
    assert len(set(seen.values())) == len(seen)  # each worker has its own backend
    assert_recovered(server, pg_admin, appname)


def test_preload_with_a_pool_used_in_the_master(spawn: Any, pg_dsn: str, pg_admin: Any) -> None:
    server, appname = start(
        spawn, pg_dsn, workers=2, extra_args=("--preload",), env={"RC_OPEN_IN_MASTER": "1"}
    )
    master_backends = {s["pid"] for s in pg.app_sessions(pg_admin, appname)}
    assert len(master_backends) == 1
    worker_backends = set()
    for _ in range(20):
        worker_backends.add(get_json(server, "/pid")["backend"])
    assert not worker_backends & master_backends  # children never reuse the parent's sockets
    # the master's own session is still there: no child sent it a Terminate
    assert master_backends <= {s["pid"] for s in pg.app_sessions(pg_admin, appname)}
    assert "before a fork" in server.log_text()
    assert_recovered(server, pg_admin, appname)


def test_max_requests_recycles_workers_under_load(spawn: Any, pg_dsn: str, pg_admin: Any) -> None:
    server, appname = start(spawn, pg_dsn, workers=2,
                            extra_args=("--max-requests", "15", "--max-requests-jitter", "3"))
    first_workers = set(server.worker_pids())

    def load(_: int) -> None:
        for _ in range(25):
            status, _, _ = servers.http_get(server.url + "/")
            assert status == 200

    in_threads(3, load)
    pg.wait_until(lambda: set(server.worker_pids()) - first_workers, message="workers recycled")
    pg.wait_until(
        lambda: len(pg.app_sessions(pg_admin, appname)) <= 2 * 2,
        message="recycled workers' sessions closed",
    )
    assert_recovered(server, pg_admin, appname)


def test_worker_timeout_during_a_query_cancels_it(spawn: Any, pg_dsn: str, pg_admin: Any) -> None:
    server, appname = start(spawn, pg_dsn, extra_args=("--timeout", "2"))
    status, _, _ = servers.http_get(server.url + "/slow?s=30", timeout=60)
    assert status in (500, 502) or status >= 500
    # SystemExit reached the view: psycopg cancelled the statement, teardown released,
    # the worker died; nothing of it remains active on the server
    pg.wait_until(
        lambda: not [s for s in pg.app_sessions(pg_admin, appname) if s["state"] != "idle"],
        timeout=20,
        message="no active query of the timed-out worker",
    )
    assert "WORKER TIMEOUT" in server.log_text()
    assert_recovered(server, pg_admin, appname)


def test_graceful_shutdown_finishes_requests_and_leaves_no_sessions(
    spawn: Any, pg_dsn: str, pg_admin: Any
) -> None:
    server, appname = start(spawn, pg_dsn, worker_class="gthread", threads=4, graceful_timeout=10)
    results: list[int] = []
    clients = [threading.Thread(target=lambda: results.append(
        servers.http_get(server.url + "/slow?s=2", timeout=60)[0])) for _ in range(2)]
    for th in clients:
        th.start()
    pg.wait_until(lambda: len([s for s in pg.app_sessions(pg_admin, appname)
                               if s["state"] == "active"]) == 2, message="requests running")
    server.signal(signal.SIGTERM)
    for th in clients:
        th.join(60)
    assert results == [200, 200]
    server.stop()
    pg.wait_until(lambda: pg.app_sessions(pg_admin, appname) == [], timeout=20,
                  message="all sessions of the stopped server gone")


def test_sigkill_after_graceful_timeout_is_cleaned_up_by_the_server(
    spawn: Any, pg_dsn: str, pg_admin: Any
) -> None:
    """No Python runs after SIGKILL: the documented session settings free the backend."""
    server, appname = start(
        spawn, pg_dsn, graceful_timeout=1,
        env={"RC_SESSION_SETTINGS": "client_connection_check_interval=200ms"},
    )
    thread = threading.Thread(target=lambda: _ignore_errors(
        lambda: servers.http_get(server.url + "/slow?s=60", timeout=60)))
    thread.start()
    pg.wait_until(lambda: [s for s in pg.app_sessions(pg_admin, appname)
                           if s["state"] == "active"], message="query running")
    server.signal(signal.SIGTERM)  # the worker is killed after 1 s, mid-query
    server.stop()
    thread.join(60)
    pg.wait_until(lambda: pg.app_sessions(pg_admin, appname) == [], timeout=20,
                  message="the killed worker's backend noticed and ended its query")


def _ignore_errors(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except (OSError, ConnectionError, psycopg.Error):
        pass
    time.sleep(0)
