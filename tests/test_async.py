"""``async def`` views: the connection belongs to the request across asgiref's thread.

Flask runs an ``async def`` view through asgiref's ``async_to_sync``: the coroutine runs
in a short-lived thread of asgiref's with the request's context copied, while the
server's thread waits. Eager checkout takes the connection in ``before_request`` (the
server's thread), lazy checkout in the coroutine (asgiref's); either way it is the
request's, comes back at teardown, is answered 499 for a departed client before and after
the wait for the pool, and has its query cancelled when the client leaves. The leak
report and the stats name the thread serving the request, not asgiref's.

The end-to-end tests run tests/apps/async_app.py under real gunicorn (sync and gthread).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from flask_reqconn import ConnectionReleased, get_conn, state_of
from tests import pg, servers
from tests.appfixtures import AppFactory, what_rows
from tests.test_cancel import disconnect_after, sleeping
from tests.test_gunicorn import assert_recovered, in_threads, stats

APP = "tests.apps.async_app:create_app()"

SYNC = pytest.param({"worker_class": "sync"}, id="sync")
GTHREAD = pytest.param({"worker_class": "gthread", "threads": 4}, id="gthread")
CHECKOUTS = ["eager", "lazy"]


def start(
    spawn: Callable[..., servers.ServerProcess],
    pg_dsn: str,
    *,
    checkout: str,
    env: dict[str, str] | None = None,
    **kind: Any,
) -> tuple[servers.ServerProcess, str]:
    appname = pg.unique_name("async")
    server = spawn(
        "gunicorn",
        APP,
        env={"RC_DSN": pg_dsn, "RC_APPNAME": appname, "RC_CHECKOUT": checkout, **(env or {})},
        **kind,
    )
    return server, appname


def released(stats: dict[str, Any]) -> dict[str, int]:
    """The release reasons that happened, with their counts."""
    return {reason: n for reason, n in stats["releases"].items() if n}




# -- in process (the test client) ------------------------------------------------------


@pytest.mark.parametrize("checkout", CHECKOUTS)
def test_async_view_gets_the_request_connection_and_teardown_returns_it(
    make_app: AppFactory, checkout: str
) -> None:
    app: Flask = make_app(checkout=checkout)
    seen: dict[str, Any] = {}

    @app.get("/")
    async def index() -> str:
        await asyncio.sleep(0)
        conn = get_conn()
        seen["thread"] = threading.get_ident()
        assert get_conn() is conn  # one connection per request, in the coroutine too
        return str(conn.execute("select 1").fetchone()[0])

    for _ in range(3):
        response = app.test_client().get("/")
        assert (response.status_code, response.data) == (200, b"1")
    assert seen["thread"] != threading.get_ident()  # the view ran in asgiref's thread
    s = state_of(app).stats()
    assert s["checked_out"] == 0
    assert s["checkouts"] == 3 and released(s) == {"teardown": 3}


def test_async_view_leak_report_names_the_thread_serving_the_request(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Lazy checkout runs in asgiref's thread; the report names the server's."""
    app: Flask = make_app(checkout="lazy", leak_threshold=0.2)
    seen: dict[str, Any] = {}

    @app.get("/report")
    async def report() -> str:
        conn = get_conn()
        seen["coroutine"] = threading.get_ident()
        conn.execute("select pg_sleep(1.5)")  # a running watcher takes up to 1 s to tick
        return "done"

    def watch_holders() -> None:
        seen["holders"] = pg.wait_until(
            lambda: state_of(app).stats()["pools"]["default"]["holders"],
            timeout=20,
            interval=0.02,
        )

    watcher = threading.Thread(target=watch_holders)
    with caplog.at_level("WARNING", logger="flask_reqconn"):
        watcher.start()
        assert app.test_client().get("/report").status_code == 200
        watcher.join(30)
    warnings = [r.getMessage() for r in caplog.records if "threshold 0.2 s" in r.getMessage()]
    assert len(warnings) == 1, warnings
    serving = threading.get_ident()  # the test client serves the request in this thread
    assert seen["coroutine"] != serving
    assert f"thread {serving})" in warnings[0], warnings[0]
    assert seen["holders"][0]["thread"] == serving
    # the site is the coroutine's line, not the view's definition (an eager guess)
    assert re.search(r"checked out at test_async\.py:\d+ in report;", warnings[0]), warnings[0]


def test_async_view_connection_kept_past_its_request_refuses_later_use(
    make_app: AppFactory,
) -> None:
    app: Flask = make_app(checkout="lazy")
    kept: list[Any] = []

    @app.get("/keep")
    async def keep() -> str:
        kept.append(get_conn())
        return "kept"

    @app.get("/use-kept")
    async def use_kept() -> str:
        try:
            kept[0].execute("select 1")
        except ConnectionReleased as exc:
            return str(exc)
        return "ran"

    client = app.test_client()
    assert client.get("/keep").status_code == 200
    response = client.get("/use-kept")
    assert response.data.startswith(b"this connection was handed back by GET /keep")


# -- under gunicorn ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("checkout", CHECKOUTS)
@pytest.mark.parametrize("kind", [SYNC, GTHREAD])
def test_async_views_under_gunicorn_check_out_and_release_by_teardown(
    spawn: Any, pg_dsn: str, pg_admin: Any, kind: dict[str, Any], checkout: str
) -> None:
    server, appname = start(spawn, pg_dsn, checkout=checkout, **kind)
    requests = 12

    def get_some(_: int) -> None:
        for _ in range(requests // 3):
            status, _, body = servers.http_get(server.url + "/")
            assert (status, body) == (200, b"1")

    in_threads(3, get_some)
    final = assert_recovered(server, pg_admin, appname)
    assert final["checked_out"] == 0
    assert final["checkouts"] == requests
    assert released(final) == {"teardown": requests}


@pytest.mark.slow
@pytest.mark.parametrize("checkout", CHECKOUTS)
@pytest.mark.parametrize("kind", [SYNC, pytest.param({"worker_class": "gthread", "threads": 1},
                                                     id="gthread-1-thread")])  # fmt: skip
def test_async_view_whose_client_left_before_the_wait_is_answered_499_without_a_checkout(
    spawn: Any, pg_dsn: str, pg_admin: Any, kind: dict[str, Any], checkout: str
) -> None:
    """One request at a time: clients that leave while a slow request runs are seen gone
    when their turn comes, before the pool is asked (eager: in ``before_request``; lazy:
    in the coroutine, in asgiref's thread)."""
    server, appname = start(spawn, pg_dsn, checkout=checkout, **kind)
    holder = threading.Thread(target=servers.http_get, args=(server.url + "/slow?s=1.5",))
    holder.start()
    pg.wait_until(lambda: sleeping(pg_admin, appname), message="the slow request running")
    aborted = 6
    in_threads(aborted, lambda i: servers.send_and_close(
        server.url, "/slow?s=5", how="rst" if i % 2 else "close"))  # fmt: skip
    holder.join(60)
    pg.wait_until(lambda: stats(server)["client_gone"] == aborted, timeout=60,
                  message="every departed client answered 499")  # fmt: skip
    final = assert_recovered(server, pg_admin, appname)
    assert final["client_gone"] == aborted
    assert final["checkouts"] == 1  # the slow request's only
    assert final["releases"]["client_gone"] == 0  # no connection was taken for them
    assert "Traceback" not in server.log_text()


@pytest.mark.slow
@pytest.mark.parametrize("checkout", CHECKOUTS)
def test_async_view_whose_client_left_during_the_wait_is_answered_499_right_after_checkout(
    spawn: Any, pg_dsn: str, pg_admin: Any, checkout: str
) -> None:
    """A pool of 1 held by a slow request; the waiters' clients leave while they wait."""
    server, appname = start(spawn, pg_dsn, checkout=checkout, worker_class="gthread",
                            threads=8, env={"RC_MAX_SIZE": "1", "RC_TIMEOUT": "30"})  # fmt: skip
    holder = threading.Thread(target=servers.http_get, args=(server.url + "/slow?s=3",))
    holder.start()
    pg.wait_until(lambda: sleeping(pg_admin, appname), message="the one connection busy")
    waiting = 4
    in_threads(waiting, lambda i: servers.send_and_close(
        server.url, "/slow?s=5", how="after_ms", ms=300))  # fmt: skip
    holder.join(60)
    pg.wait_until(lambda: stats(server)["client_gone"] == waiting, timeout=60,
                  message="every departed waiter answered 499")  # fmt: skip
    final = assert_recovered(server, pg_admin, appname)
    assert final["client_gone"] == waiting
    assert final["releases"]["client_gone"] >= 1  # seen right after the checkout
    assert final["releases"]["teardown"] == 1  # the holder
    assert "Traceback" not in server.log_text()


@pytest.mark.slow
@pytest.mark.parametrize("kind", [SYNC, GTHREAD])
def test_async_view_whose_client_left_before_get_conn_is_answered_499(
    spawn: Any, pg_dsn: str, pg_admin: Any, kind: dict[str, Any]
) -> None:
    """Lazy: the client leaves while the coroutine awaits; ``get_conn()`` then sees it."""
    server, appname = start(spawn, pg_dsn, checkout="lazy", **kind)
    disconnect_after(server, "GET", "/late?s=1", 0.3)
    pg.wait_until(lambda: stats(server)["client_gone"] == 1, timeout=30,
                  message="the departed client answered 499")  # fmt: skip
    final = assert_recovered(server, pg_admin, appname)
    assert final["checkouts"] == 0
    assert "Traceback" not in server.log_text()


@pytest.mark.slow
@pytest.mark.parametrize("checkout", CHECKOUTS)
@pytest.mark.parametrize("kind", [SYNC, GTHREAD])
def test_async_view_query_is_cancelled_when_its_client_leaves(
    spawn: Any, pg_dsn: str, pg_admin: Any, kind: dict[str, Any], checkout: str
) -> None:
    server, appname = start(spawn, pg_dsn, checkout=checkout, **kind)
    disconnect_after(server, "GET", "/slow?s=30", 0.3)
    pg.wait_until(lambda: not sleeping(pg_admin, appname), timeout=15,
                  message="the pg_sleep(30) was cancelled")  # fmt: skip
    final = assert_recovered(server, pg_admin, appname)
    assert final["cancelled"] == 1
    assert final["client_gone"] == 1
    assert "Traceback" not in server.log_text()  # a 499, not a 500 with a stack


@pytest.mark.slow
@pytest.mark.parametrize("checkout", CHECKOUTS)
def test_async_view_connection_kept_past_its_request_refuses_use_in_a_later_request(
    spawn: Any, pg_dsn: str, pg_admin: Any, what_table: str, checkout: str
) -> None:
    server, appname = start(
        spawn, pg_dsn, checkout=checkout, worker_class="gthread", threads=4,
        env={"RC_MAX_SIZE": "1", "RC_TABLE": what_table},
    )  # fmt: skip
    assert servers.http_get(server.url + "/keep")[0] == 200
    status, _, body = servers.http_get(server.url + "/use-kept")
    assert status == 200
    assert json.loads(body)["refused"].startswith("this connection was handed back by GET /keep")
    assert what_rows(pg_admin, what_table) == []
    assert_recovered(server, pg_admin, appname)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "checkout"),
    [
        pytest.param({"worker_class": "gthread", "threads": 4}, "lazy", id="gthread-lazy"),
        pytest.param({"worker_class": "gthread", "threads": 4}, "eager", id="gthread-eager"),
        pytest.param({"worker_class": "sync"}, "lazy", id="sync-lazy"),
    ],
)
def test_async_view_leak_report_under_gunicorn_names_the_worker_thread_not_asgirefs(
    spawn: Any, pg_dsn: str, pg_admin: Any, kind: dict[str, Any], checkout: str
) -> None:
    server, appname = start(spawn, pg_dsn, checkout=checkout,
                            env={"RC_LEAK_THRESHOLD": "0.3", "RC_LOG": "WARNING"},
                            **kind)  # fmt: skip
    status, headers, body = servers.http_get(server.url + "/hold?s=1")
    assert status == 200
    serving = int(headers["x-serving-thread"])
    coroutine = json.loads(body)["coroutine_thread"]
    assert serving != coroutine  # the view ran in asgiref's thread
    reports = pg.wait_until(
        lambda: re.findall(r"threshold 0\.3 s\) by GET /hold \(endpoint 'hold', thread (\d+)\)",
                           server.log_text()),
        timeout=20, message="the leak WARNING",
    )  # fmt: skip
    assert reports == [str(serving)]
    assert_recovered(server, pg_admin, appname)


@pytest.mark.slow
def test_async_view_with_lazy_checkout_is_committed_by_atomic_mode_after_the_view(
    spawn: Any, pg_dsn: str, pg_admin: Any, what_table: str
) -> None:
    """The view checks out in asgiref's thread; ``after_request`` commits in the server's."""
    env = {"RC_TRANSACTION": "atomic", "RC_TABLE": what_table}
    server, appname = start(
        spawn, pg_dsn, checkout="lazy", worker_class="gthread", threads=4, env=env
    )
    assert servers.http_get(server.url + "/insert?what=kept")[0] == 200
    assert servers.http_get(server.url + "/insert?what=dropped&status=400")[0] == 400
    assert what_rows(pg_admin, what_table) == ["kept"]  # a 400 is rolled back at release
    final = assert_recovered(server, pg_admin, appname)
    assert released(final) == {"teardown": 2}
    assert "Traceback" not in server.log_text()
