"""When a request's connection is taken and given back, with a real PostgreSQL."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from flask import Flask, request

from flask_reqconn import (
    ConnectionReleased,
    PoolExhausted,
    ReleaseReason,
    ReqConnError,
    get_conn,
    state_of,
)
from tests.appfixtures import AppFactory, reqconn_of


def stats(app: Flask) -> dict[str, Any]:
    return reqconn_of(app).stats(app)


def test_eager_checkout_happens_before_the_view_and_is_released_by_teardown(
    make_app: AppFactory,
) -> None:
    app = make_app()
    seen: dict[str, Any] = {}

    @app.before_request
    def look() -> None:  # registered after init_app: runs after the checkout
        seen["leases_before_view"] = dict(request._flask_reqconn.leases)

    @app.get("/")
    def index() -> str:
        conn = get_conn()
        assert get_conn() is conn
        seen["checked_out_in_view"] = stats(app)["checked_out"]
        return str(conn.execute("select 1").fetchone()[0])

    response = app.test_client().get("/")
    assert response.status_code == 200
    assert list(seen["leases_before_view"]) == ["default"]
    assert seen["checked_out_in_view"] == 1
    lease = seen["leases_before_view"]["default"]
    assert lease.released_by is ReleaseReason.TEARDOWN
    s = stats(app)
    assert s["checked_out"] == 0
    assert s["checkouts"] == 1
    assert s["releases"]["teardown"] == 1
    pool = s["pools"]["default"]["pool"]
    assert pool["pool_available"] == pool["pool_size"]


def test_lazy_mode_checks_out_only_when_a_view_asks(make_app: AppFactory) -> None:
    app = make_app(checkout="lazy")

    @app.get("/nodb")
    def nodb() -> str:
        return "ok"

    @app.get("/db")
    def db() -> str:
        return str(get_conn().execute("select 2").fetchone()[0])

    client = app.test_client()
    assert client.get("/nodb").status_code == 200
    assert stats(app)["checkouts"] == 0
    assert client.get("/db").data == b"2"
    s = stats(app)
    assert s["checkouts"] == 1 and s["checked_out"] == 0


def test_unknown_url_does_not_check_out(make_app: AppFactory) -> None:
    app = make_app()
    assert app.test_client().get("/nope").status_code == 404
    assert stats(app)["checkouts"] == 0


def test_get_conn_outside_a_request_says_how_to_fix_it(make_app: AppFactory) -> None:
    app = make_app()
    with pytest.raises(ReqConnError, match="outside of a request.*reqconn.connection"):
        get_conn()
    with app.app_context(), pytest.raises(ReqConnError, match="outside of a request"):
        get_conn()


def test_get_conn_before_init_app_says_to_call_init_app(make_app: AppFactory) -> None:
    app = make_app(init=False)

    @app.get("/")
    def index() -> str:
        get_conn()
        return "unreachable"

    with app.test_request_context("/"), pytest.raises(ReqConnError, match="init_app"):
        get_conn()


def test_connection_context_manager_for_scripts(make_app: AppFactory) -> None:
    app = make_app()
    reqconn = reqconn_of(app)
    with app.app_context(), reqconn.connection() as conn:
        assert conn.execute("select 5").fetchone() == (5,)
    with reqconn.connection(app=app) as conn:
        assert conn.execute("select 6").fetchone() == (6,)


def test_exception_in_view_releases_and_answers_500(make_app: AppFactory) -> None:
    app = make_app()

    @app.get("/boom")
    def boom() -> str:
        get_conn().execute("select 1")
        raise ValueError("boom")

    assert app.test_client().get("/boom").status_code == 500
    s = stats(app)
    assert s["checked_out"] == 0 and s["releases"]["teardown"] == 1


@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt, GeneratorExit])
def test_base_exception_from_view_still_releases(
    make_app: AppFactory, exc_type: type[BaseException]
) -> None:
    app = make_app()
    leases: list[Any] = []

    @app.get("/exit")
    def leave() -> str:
        get_conn().execute("select 1")
        leases.append(request._flask_reqconn.leases["default"])
        raise exc_type()

    with pytest.raises(exc_type):
        app.test_client().get("/exit")
    assert leases[0].released_by is not None
    s = stats(app)
    assert s["checked_out"] == 0
    assert sum(s["releases"].values()) == 1


def test_base_exception_in_before_request_hook_is_released_by_the_wsgi_wrapper(
    make_app: AppFactory,
) -> None:
    app = make_app()
    leases: list[Any] = []

    @app.before_request
    def explode() -> None:
        leases.append(request._flask_reqconn.leases["default"])
        raise SystemExit(3)

    @app.get("/")
    def index() -> str:
        return "unreachable"

    with pytest.raises(SystemExit):
        app.test_client().get("/")
    assert leases[0].released_by in (ReleaseReason.TEARDOWN, ReleaseReason.EXCEPTION)
    assert stats(app)["checked_out"] == 0


def test_client_abort_error_leaving_the_app_is_released_as_abort(make_app: AppFactory) -> None:
    app = make_app()
    leases: list[Any] = []

    @app.teardown_request
    def explode(exc: BaseException | None) -> None:
        # registered after init_app: runs *before* the library's teardown and,
        # raising, stops it (Flask does not catch teardown errors).
        leases.append(request._flask_reqconn.leases["default"])
        raise BrokenPipeError(32, "Broken pipe")

    @app.get("/")
    def index() -> str:
        return "x"

    with pytest.raises(BrokenPipeError):
        app.test_client().get("/")
    assert leases[0].released_by is ReleaseReason.ABORT
    assert stats(app)["releases"]["abort"] == 1


def test_get_conn_after_release_raises_connection_released(make_app: AppFactory) -> None:
    app = make_app()

    @app.get("/")
    def index() -> str:
        request._flask_reqconn.leases["default"].release(ReleaseReason.TEARDOWN)
        with pytest.raises(ConnectionReleased, match="already given back"):
            get_conn()
        return "ok"

    assert app.test_client().get("/").status_code == 200


def burst(app: Flask, n: int, path: str) -> list[tuple[int, float, str | None]]:
    results: list[tuple[int, float, str | None]] = []
    lock = threading.Lock()
    start = threading.Barrier(n)

    def one() -> None:
        client = app.test_client()
        start.wait()
        t0 = time.monotonic()
        r = client.get(path)
        with lock:
            results.append((r.status_code, time.monotonic() - t0, r.headers.get("Retry-After")))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads), "burst hung"
    return results


def test_burst_into_small_pool_gets_fast_503s_and_leaves_the_pool_full(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(max_size=2, timeout=0.5, retry_after=3)

    @app.get("/slow")
    def slow() -> str:
        get_conn().execute("select pg_sleep(1.5)")
        return "ok"

    with caplog.at_level("WARNING", logger="flask_reqconn"):
        results = burst(app, 20, "/slow")
    codes = sorted(code for code, _, _ in results)
    assert codes.count(200) >= 2
    assert codes.count(503) >= 10
    assert set(codes) <= {200, 503}
    for code, elapsed, retry_after in results:
        if code == 503:
            assert retry_after == "3"
            assert elapsed < 30  # hang guard, not a measurement
    assert any("exhausted" in r.getMessage() for r in caplog.records)
    s = stats(app)
    assert s["checked_out"] == 0
    assert s["exhausted"] == codes.count(503)
    pool = s["pools"]["default"]["pool"]
    assert pool["pool_available"] == pool["pool_size"] <= 2


def test_max_waiting_rejects_at_once(make_app: AppFactory) -> None:
    app = make_app(max_size=1, max_waiting=1, timeout=20)

    @app.get("/slow")
    def slow() -> str:
        get_conn().execute("select pg_sleep(1)")
        return "ok"

    results = burst(app, 6, "/slow")
    codes = [code for code, _, _ in results]
    assert codes.count(503) >= 3
    assert stats(app)["checked_out"] == 0


def test_pool_exhausted_response_can_be_overridden(make_app: AppFactory) -> None:
    app = make_app(max_size=1, timeout=0.2)

    @app.errorhandler(PoolExhausted)
    def busy(exc: PoolExhausted) -> tuple[dict[str, str], int, dict[str, str]]:
        return {"error": "busy", "pool": exc.pool_name}, 503, {"Retry-After": "7"}

    @app.get("/hold")
    def hold() -> str:
        get_conn().execute("select pg_sleep(1.2)")
        return "ok"

    results = burst(app, 3, "/hold")
    assert [r[2] for r in results if r[0] == 503][:1] == ["7"]


def test_password_never_reaches_logs_or_error_pages(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(timeout=0.5, min_size=0)
    app.config["DEBUG"] = False
    # a server that refuses: nothing listens on port 1
    state = state_of(app)
    holder = state.pools["default"]
    import dataclasses

    holder.settings = dataclasses.replace(
        holder.settings, conninfo="postgresql://app:hunter2secret@127.0.0.1:1/app"
    )

    @app.get("/")
    def index() -> str:
        return "unreachable"

    with caplog.at_level("DEBUG"):
        response = app.test_client().get("/")
    assert response.status_code == 503
    assert b"hunter2secret" not in response.data
    assert all("hunter2secret" not in r.getMessage() for r in caplog.records)
