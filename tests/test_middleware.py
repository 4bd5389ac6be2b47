"""The WSGI wrapper, as plain WSGI (no Flask request): every lease released exactly once.

The inner WSGI app takes a real lease of a real pool and leaves it in the
environ, as the request hooks do; the wrapper must release it whatever the
server does with the response iterable.
"""

from __future__ import annotations

import gc
import io
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from werkzeug.test import EnvironBuilder
from werkzeug.wsgi import ClosingIterator, FileWrapper

from flask_reqconn import ReleaseReason, state_of
from flask_reqconn.lease import Lease, RequestLeases
from flask_reqconn.middleware import GuardedIterable, LeaseGuard, body_may_use_connection
from flask_reqconn.state import AppState
from tests.appfixtures import AppFactory


class Inner:
    """A plain WSGI app that checks out like a request does, then answers *body*."""

    def __init__(self, state: AppState, body: Callable[[], Iterable[bytes]], *,
                 streamed: bool = True, error: BaseException | None = None) -> None:  # fmt: skip
        self.state = state
        self.body = body
        self.streamed = streamed
        self.error = error
        self.lease: Lease | None = None
        self.closed = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        req = RequestLeases()
        self.lease = self.state.pools["default"].checkout(method="GET", path="/", endpoint="x")
        req.leases["default"] = self.lease
        req.streamed = self.streamed
        environ[self.state.environ_key] = req
        if self.error is not None:
            raise self.error
        start_response("200 OK", [])
        return ClosingIterator(self.body(), [self._closed])

    def _closed(self) -> None:
        self.closed += 1


@pytest.fixture
def state(make_app: AppFactory) -> AppState:
    return state_of(make_app())


def environ() -> dict[str, Any]:
    return EnvironBuilder("/").get_environ()


def chunks() -> Iterator[bytes]:
    yield b"a"
    yield b"b"


def released_by(inner: Inner) -> ReleaseReason | None:
    assert inner.lease is not None
    return inner.lease.released_by


def test_a_fully_sent_stream_is_released_at_close(state: AppState) -> None:
    inner = Inner(state, chunks)
    body = LeaseGuard(inner, state)(environ(), lambda *a: None)
    assert isinstance(body, GuardedIterable)
    assert list(body) == [b"a", b"b"]
    assert inner.lease is not None and inner.lease.active  # not before close()
    body.close()  # type: ignore[attr-defined]
    assert released_by(inner) is ReleaseReason.CLOSE and inner.closed == 1


def test_a_stream_closed_early_is_an_abort_and_close_is_idempotent(state: AppState) -> None:
    inner = Inner(state, chunks)
    body = LeaseGuard(inner, state)(environ(), lambda *a: None)
    assert next(iter(body)) == b"a"
    body.close()  # type: ignore[attr-defined]
    body.close()  # type: ignore[attr-defined]
    assert released_by(inner) is ReleaseReason.ABORT and inner.closed == 1
    assert state.stats()["releases"]["abort"] == 1


@pytest.mark.parametrize(
    ("error", "reason"),
    [(RuntimeError("boom"), ReleaseReason.EXCEPTION), (BrokenPipeError(), ReleaseReason.ABORT),
     (KeyboardInterrupt(), ReleaseReason.EXCEPTION)],
)  # fmt: skip
def test_an_error_leaving_the_app_releases_at_once(
    state: AppState, error: BaseException, reason: ReleaseReason
) -> None:
    inner = Inner(state, chunks, error=error)
    with pytest.raises(type(error)):
        LeaseGuard(inner, state)(environ(), lambda *a: None)
    assert released_by(inner) is reason


@pytest.mark.parametrize(
    ("error", "reason"),
    [(RuntimeError("boom"), ReleaseReason.EXCEPTION),
     (ConnectionResetError(), ReleaseReason.ABORT)],
)  # fmt: skip
def test_an_error_while_iterating_releases_at_once(
    state: AppState, error: BaseException, reason: ReleaseReason
) -> None:
    def failing() -> Iterator[bytes]:
        yield b"a"
        raise error

    inner = Inner(state, failing)
    body = LeaseGuard(inner, state)(environ(), lambda *a: None)
    with pytest.raises(type(error)):
        list(body)
    assert released_by(inner) is reason
    body.close()  # type: ignore[attr-defined]
    assert state.stats()["checked_out"] == 0


def test_a_response_that_holds_nothing_is_passed_through(state: AppState) -> None:
    def plain(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"ok"]

    body = LeaseGuard(plain, state)(environ(), lambda *a: None)
    assert body == [b"ok"]


def test_a_response_never_closed_is_returned_by_the_finalizer(
    state: AppState, caplog: pytest.LogCaptureFixture
) -> None:
    inner = Inner(state, chunks)
    body = LeaseGuard(inner, state)(environ(), lambda *a: None)
    assert next(iter(body)) == b"a"
    del body
    gc.collect()
    assert inner.lease is not None and inner.lease.active  # deferred to a safe point
    with caplog.at_level("WARNING", logger="flask_reqconn.pool"):
        state.stats()  # a safe point: runs the deferred finalizer
    assert released_by(inner) is ReleaseReason.FINALIZER
    assert any("never released" in r.getMessage() for r in caplog.records)
    assert state.stats()["finalized"] == 1  # summed at the top level too


@pytest.mark.parametrize(
    ("body", "may"),
    [(chunks(), True), ([b"x"], False), (b"x", False), (iter([b"x"]), False),
     (FileWrapper(io.BytesIO(b"x")), False), (ClosingIterator([b"x"]), False)],
)  # fmt: skip
def test_which_bodies_may_still_use_the_connection(body: Any, may: bool) -> None:
    assert body_may_use_connection(body) is may
