"""Release is exactly once, whoever gets there first, from any thread."""

from __future__ import annotations

import functools
import gc
import threading
from typing import Any

import pytest
from flask import Flask, stream_with_context
from werkzeug.test import EnvironBuilder

from flask_reqconn import ReleaseReason, checkout, get_conn, state_of
from flask_reqconn.lease import LeaseState, RequestLeases
from flask_reqconn.middleware import GuardedIterable
from tests.appfixtures import AppFactory, reqconn_of


def holder_of(app: Flask) -> Any:
    return state_of(app).pools["default"]


def race(*targets: Any) -> None:
    barrier = threading.Barrier(len(targets))

    def run(fn: Any) -> None:
        barrier.wait()
        fn()

    threads = [threading.Thread(target=run, args=(fn,)) for fn in targets]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not any(th.is_alive() for th in threads), "release hung"


def test_concurrent_releases_put_the_connection_back_exactly_once(make_app: AppFactory) -> None:
    app = make_app(max_size=2)
    holder = holder_of(app)
    reasons = list(ReleaseReason)
    rounds = 150
    for _ in range(rounds):
        lease = holder.checkout()
        results: list[bool] = []
        lock = threading.Lock()

        def release(
            reason: ReleaseReason, lease: Any = lease, results: list[bool] = results,
            lock: threading.Lock = lock,
        ) -> None:
            done = lease.release(reason)
            with lock:
                results.append(done)

        race(*[functools.partial(release, r) for r in reasons])
        assert results.count(True) == 1, results
        assert lease.state is LeaseState.RELEASED
        assert lease.released_by in reasons
    s = reqconn_of(app).stats(app)
    assert s["checkouts"] == rounds
    assert sum(s["releases"].values()) == rounds
    pool = s["pools"]["default"]["pool"]
    # a double putconn would grow the pool past max_size or list one connection twice
    assert pool["pool_size"] <= 2
    assert pool["pool_available"] == pool["pool_size"]
    conns = [holder.pool.getconn(timeout=5) for _ in range(pool["pool_size"])]
    assert len({id(c) for c in conns}) == len(conns)
    for conn in conns:
        holder.pool.putconn(conn)


def test_teardown_and_response_close_race(make_app: AppFactory) -> None:
    """The two real releasers of a stream: Flask's second teardown and close()."""
    app = make_app(max_size=1)
    state = state_of(app)
    for _ in range(50):
        with app.test_request_context("/race"):
            from flask import request

            req = checkout.request_leases(state)
            checkout.checkout(state, req, "default")
            req.streamed = True
            environ = request.environ
        guarded = GuardedIterable([b"x"], req, state)
        race(functools.partial(req.end, ReleaseReason.TEARDOWN), guarded.close)
        lease = req.leases["default"]
        assert lease.state is LeaseState.RELEASED
        assert environ  # keep the request's environ alive through the race
    s = reqconn_of(app).stats(app)
    assert s["checked_out"] == 0
    assert s["releases"]["teardown"] + s["releases"]["close"] + s["releases"]["abort"] == 50


def test_release_of_an_inactive_lease_is_a_no_op(make_app: AppFactory) -> None:
    app = make_app()
    holder = holder_of(app)
    lease = holder.checkout()
    assert lease.release(ReleaseReason.TEARDOWN) is True
    assert lease.release(ReleaseReason.CLOSE) is False
    assert lease.release(ReleaseReason.FINALIZER) is False
    assert lease.released_by is ReleaseReason.TEARDOWN


def test_wsgi_wrapper_passes_non_streams_through_untouched(make_app: AppFactory) -> None:
    app = make_app(checkout="lazy")

    @app.get("/")
    def index() -> str:
        return "plain"

    environ = EnvironBuilder(path="/").get_environ()
    result = app.wsgi_app(environ, lambda *a: None)
    assert not isinstance(result, GuardedIterable)


@pytest.mark.parametrize("body", ["fixed", "streamed"])
def test_a_request_leaves_nothing_for_the_garbage_collector(
    make_app: AppFactory, body: str
) -> None:
    """As Flask frees its own request objects: once a request is over, nothing of
    flask-reqconn's is left in a reference cycle (the environ and the request's
    leases, the lease and its request), and the connection, which keeps the lease it
    was released by, does not keep the request."""
    app = make_app()

    @app.get("/")
    def index() -> Any:
        get_conn().execute("select 1")
        if body == "streamed":
            return stream_with_context(iter([b"a", b"b"]))
        return "ok"

    client = app.test_client()
    assert client.get("/").status_code == 200  # the pool is open
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            assert client.get("/").data in (b"ok", b"ab")
        state = state_of(app)
        requests = [
            o for o in gc.get_objects() if isinstance(o, RequestLeases) and o.state is state
        ]
    finally:
        gc.enable()
    # not one per request: at most the last ones, which this thread's context and the
    # test client still name
    assert len(requests) <= 2, requests
    assert reqconn_of(app).stats(app)["checked_out"] == 0
