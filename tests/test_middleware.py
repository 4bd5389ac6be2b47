"""The WSGI wrapper, as plain WSGI (no Flask request): every lease released exactly once.

The inner WSGI app takes a real lease of a real pool and leaves it in the
environ, as the request hooks do; the wrapper must release it whatever the
server does with the response iterable.
"""

from __future__ import annotations

import gc
import io
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import psycopg
import pytest
from werkzeug.test import EnvironBuilder
from werkzeug.wsgi import ClosingIterator, FileWrapper

from flask_reqconn import ClientGone, ReleaseReason, state_of
from flask_reqconn.lease import Lease, RequestLeases
from flask_reqconn.middleware import GuardedIterable, LeaseGuard, body_may_use_connection
from flask_reqconn.names import CancelReason
from flask_reqconn.probes import SocketProbe
from flask_reqconn.state import AppState
from tests import pg
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
        self.req: RequestLeases | None = None
        self.closed = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        req = self.req = RequestLeases(environ, "x")
        self.lease = self.state.pools["default"].checkout(req)
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


# -- a stream whose client left ends quietly ----------------------------------------------


def cancel_when_running(lease: Lease, reason: CancelReason) -> threading.Thread:
    """Cancel *lease*'s query from another thread once PostgreSQL runs its ``pg_sleep``."""

    def cancel() -> None:
        assert lease.conn is not None
        pid = lease.conn.info.backend_pid
        with psycopg.connect(lease.conn.info.dsn, autocommit=True) as admin:
            pg.wait_until(
                lambda: admin.execute(
                    "select 1 from pg_stat_activity where pid = %s and state = 'active'"
                    " and query like '%%pg_sleep%%'",
                    (pid,),
                ).fetchone(),
                message="the stream's pg_sleep running",
            )
        assert lease.cancel(reason, 5.0)

    thread = threading.Thread(target=cancel)
    thread.start()
    return thread


def sleeping_stream(inner: Inner, seconds: float = 30) -> Callable[[], Iterator[bytes]]:
    def body() -> Iterator[bytes]:
        yield b"first"
        assert inner.lease is not None and inner.lease.conn is not None
        inner.lease.conn.execute("select pg_sleep(%s)", (seconds,))
        yield b"never"

    return body


def stream_gone_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "flask_reqconn.middleware" and r.levelname == "INFO"
    ]


def test_a_stream_whose_client_left_mid_query_ends_quietly_with_one_info_line(
    state: AppState, caplog: pytest.LogCaptureFixture
) -> None:
    """The watcher's cancel (a real one, of a running query) ends the body, not the server."""
    inner = Inner(state, lambda: iter(()))
    inner.body = sleeping_stream(inner)
    body = LeaseGuard(inner, state)(environ(), lambda *a: None)
    assert next(iter(body)) == b"first"
    assert inner.lease is not None
    canceller = cancel_when_running(inner.lease, CancelReason.CLIENT_GONE)
    with caplog.at_level("INFO", logger="flask_reqconn.middleware"):
        with pytest.raises(StopIteration):
            next(iter(body))  # not QueryCanceled
        canceller.join(30)
        with pytest.raises(StopIteration):
            next(iter(body))
        body.close()  # type: ignore[attr-defined]
    assert released_by(inner) is ReleaseReason.ABORT and inner.closed == 1
    lines = stream_gone_lines(caplog)
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        "client gone during the streamed response of GET /: its query was cancelled;"
        " the stream ended after "
    )
    assert state.stats()["checked_out"] == 0


def test_client_gone_raised_by_the_stream_after_the_cancel_ends_it_quietly(
    state: AppState, caplog: pytest.LogCaptureFixture
) -> None:
    """The cancel came between two queries: the next ``get_conn()`` raises ClientGone."""
    inner = Inner(state, lambda: iter(()))

    def body() -> Iterator[bytes]:
        yield b"first"
        assert inner.lease is not None and inner.lease.cancelled is CancelReason.CLIENT_GONE
        raise ClientGone()  # what get_conn() raises for such a lease

    inner.body = body
    stream = LeaseGuard(inner, state)(environ(), lambda *a: None)
    assert next(iter(stream)) == b"first"
    assert inner.lease is not None and inner.lease.cancel(CancelReason.CLIENT_GONE, 5.0)
    with caplog.at_level("INFO", logger="flask_reqconn.middleware"):
        assert list(stream) == []
    assert released_by(inner) is ReleaseReason.ABORT
    assert [line.split(";")[0] for line in stream_gone_lines(caplog)] == [
        "client gone during the streamed response of GET /: its next query was not run"
    ]
    stream.close()  # type: ignore[attr-defined]


def test_a_statement_timeout_in_a_stream_is_not_a_client_abort(
    state: AppState, caplog: pytest.LogCaptureFixture
) -> None:
    inner = Inner(state, lambda: iter(()))

    def body() -> Iterator[bytes]:
        yield b"first"
        assert inner.lease is not None and inner.lease.conn is not None
        inner.lease.conn.execute("set statement_timeout = 50")
        inner.lease.conn.execute("select pg_sleep(5)")
        yield b"never"

    inner.body = body
    stream = LeaseGuard(inner, state)(environ(), lambda *a: None)
    with caplog.at_level("INFO", logger="flask_reqconn.middleware"):
        with pytest.raises(psycopg.errors.QueryCanceled):
            list(stream)
    assert released_by(inner) is ReleaseReason.EXCEPTION
    assert stream_gone_lines(caplog) == []
    stream.close()  # type: ignore[attr-defined]


def test_max_hold_in_a_stream_cuts_it_off_with_the_error(state: AppState) -> None:
    """Its client is still reading: a body that ended cleanly would look complete to it."""
    inner = Inner(state, lambda: iter(()))
    inner.body = sleeping_stream(inner)
    stream = LeaseGuard(inner, state)(environ(), lambda *a: None)
    assert next(iter(stream)) == b"first"
    assert inner.lease is not None
    canceller = cancel_when_running(inner.lease, CancelReason.MAX_HOLD)
    with pytest.raises(psycopg.errors.QueryCanceled) as info:
        next(iter(stream))
    canceller.join(30)
    assert released_by(inner) is ReleaseReason.EXCEPTION
    if sys.version_info >= (3, 11):
        assert "REQCONN_MAX_HOLD" in "".join(info.value.__notes__)
    stream.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("peer_left", [True, False])
def test_a_broken_pipe_in_a_stream_is_quiet_only_when_the_client_is_seen_gone(
    state: AppState, caplog: pytest.LogCaptureFixture, peer_left: bool
) -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        inner = Inner(state, lambda: iter(()))

        def body() -> Iterator[bytes]:
            yield b"first"
            raise BrokenPipeError()

        inner.body = body
        stream = LeaseGuard(inner, state)(environ(), lambda *a: None)
        req = inner.req
        assert req is not None
        req.probe = SocketProbe(ours)
        if peer_left:
            peer.close()
        with caplog.at_level("INFO", logger="flask_reqconn.middleware"):
            if peer_left:
                assert list(stream) == [b"first"]
            else:
                with pytest.raises(BrokenPipeError):
                    list(stream)
        assert released_by(inner) is ReleaseReason.ABORT
        lines = stream_gone_lines(caplog)
        assert [line.split(";")[0] for line in lines] == (
            ["client gone during the streamed response of GET /: BrokenPipeError while"
             " producing it"] if peer_left else []
        )  # fmt: skip
        stream.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("peer_left", [True, False])
def test_a_stream_closed_early_says_so_once_when_its_client_is_gone(
    state: AppState, caplog: pytest.LogCaptureFixture, peer_left: bool
) -> None:
    """The server stopped sending (a failed write): one INFO line if the client is gone."""
    ours, peer = socket.socketpair()
    with ours, peer:
        inner = Inner(state, chunks)
        stream = LeaseGuard(inner, state)(environ(), lambda *a: None)
        assert inner.req is not None
        inner.req.probe = SocketProbe(ours)
        assert next(iter(stream)) == b"a"
        if peer_left:
            peer.close()
        with caplog.at_level("INFO", logger="flask_reqconn.middleware"):
            stream.close()  # type: ignore[attr-defined]
            stream.close()  # type: ignore[attr-defined]
        assert released_by(inner) is ReleaseReason.ABORT
        lines = stream_gone_lines(caplog)
        assert [line.split(";")[0] for line in lines] == (
            ["client gone during the streamed response of GET /: the server stopped sending it"]
            if peer_left else []
        )  # fmt: skip


def test_client_gone_prints_as_499_client_closed_request() -> None:
    exc = ClientGone()
    assert exc.name == "Client Closed Request"
    assert str(exc).startswith("499 Client Closed Request: ")
    assert exc.get_response().status == "499 Client Closed Request"
