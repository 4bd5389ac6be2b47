"""Release is exactly once, whoever gets there first, from any thread."""

from __future__ import annotations

import functools
import threading
from typing import Any

from flask import Flask
from werkzeug.test import EnvironBuilder

from flask_reqconn import ReleaseReason, checkout, state_of
from flask_reqconn.lease import LeaseState
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
