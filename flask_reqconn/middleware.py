"""The WSGI wrapper that releases a request's connections whatever happens.

``init_app`` wraps ``app.wsgi_app`` in :class:`LeaseGuard`. The request hooks
release connections on the normal path; this wrapper covers the rest:

- a request body is read before the app runs, or guarded while the view reads
  it (:mod:`flask_reqconn.body`);
- any exception (``BaseException`` included) leaving the app releases at once;
- a streamed response keeps its connection until its iterable is closed (or
  raises while iterating), which this wrapper observes;
- if nothing ever calls ``close()``, a finalizer returns the connection at the
  next safe point and logs a WARNING;
- a stream whose client left ends quietly: the error that the departure
  caused in the generator (the watcher's cancel, ``ClientGone``, a broken
  pipe) ends the iteration instead of reaching the server, with one INFO line;
- a stream whose database connection was lost (:mod:`flask_reqconn.lost`)
  answers 503 with ``Retry-After`` if nothing was sent yet (a streamed
  response's status line waits for its first chunk), through the app's own
  handler for ``DatabaseUnavailable``; once a chunk was sent it can only be
  cut off, quietly (:mod:`flask_reqconn.streamanswer`).
"""

from __future__ import annotations

import collections
import functools
import logging
import sys
import time
import types
import typing as t
from collections.abc import Callable, Iterable, Iterator
from threading import get_ident

from psycopg.errors import InFailedSqlTransaction, QueryCanceled
from werkzeug.wsgi import ClosingIterator

from .body import BodyError, ClientBody, body_size, log_body_error, receive
from .connection import current_owner
from .errors import ClientGone, DatabaseUnavailable
from .lease import Lease, RequestLeases
from .lost import database_unavailable, lost_lease
from .names import DEFAULT_POOL, SERVING_THREAD, CancelReason, ReleaseReason, Stat
from .probes import is_client_abort, is_file_wrapper
from .streamanswer import HeldStart, StreamCut

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from flask import Flask

    from .state import AppState

#: Where the WSGI wrapper keeps a streamed response's held status line, if any.
HELD_START = "flask_reqconn.held_start"
logger = logging.getLogger(__name__)

#: What a generator raises when its client left: the cancelled query, a query on the
#: connection the cancel left in error, ``get_conn()`` after the cancel (or
#: :func:`~flask_reqconn.probes.is_client_abort` errors, checked separately).
_DEPARTURE_ERRORS = (QueryCanceled, InFailedSqlTransaction, ClientGone)


_FIXED_BODIES: tuple[type, ...] = (
    list,
    tuple,
    bytes,
    str,
    type(iter([])),
    type(iter(())),
    # werkzeug's wrapping of a response Flask converted (error pages): fixed body
    ClosingIterator,
)


def body_may_use_connection(body: t.Any) -> bool:
    """Could producing this response body still run queries?

    Generators (``stream_with_context`` or plain) and unknown iterables might,
    so their connection is kept until the response iterable is closed. Fixed
    bodies (lists, bytes, converted error pages, and files sent through the
    server's ``wsgi.file_wrapper``, which :mod:`flask_reqconn.probes` knows) cannot.
    """
    if isinstance(body, types.GeneratorType):
        return True
    if isinstance(body, _FIXED_BODIES):
        return False
    return not is_file_wrapper(body)


def _reason_for(exc: BaseException) -> ReleaseReason:
    return ReleaseReason.ABORT if is_client_abort(exc) else ReleaseReason.EXCEPTION


def _departure(req: RequestLeases, exc: BaseException, eof_means_gone: bool) -> str | None:
    """Why *exc*, raised while a stream was produced, is its client's departure, or None.

    A ``QueryCanceled`` counts only when the watcher cancelled for a departed client
    (not ``statement_timeout``, not ``REQCONN_MAX_HOLD``); a broken pipe only when the
    client is seen gone. ``""``: a departure already logged (by the checkout).
    """
    reasons = {lease.cancelled for lease in req.leases.values()}
    if CancelReason.CLIENT_GONE in reasons and isinstance(exc, _DEPARTURE_ERRORS):
        if isinstance(exc, ClientGone):
            return "its next query was not run"
        return "its query was cancelled"
    if CancelReason.MAX_HOLD in reasons:
        return None
    if isinstance(exc, ClientGone):  # the checkout saw the client gone, and said so
        return ""
    if is_client_abort(exc) and req.probe is not None and req.probe.gone(eof_means_gone):
        return f"{type(exc).__name__} while producing it"
    return None


def _log_departure(req: RequestLeases, detail: str) -> None:
    lease = next(iter(req.leases.values()), None)
    if lease is None:  # pragma: no cover - a guarded iterable has a lease
        return
    logger.info(
        "client gone during the streamed response of %s %s: %s; the stream ended after %.3f s",
        lease.method,
        lease.path,
        detail,
        time.monotonic() - lease.requested_at,
    )


class LeaseGuard:
    """WSGI middleware: release every lease of a request exactly once.

    :param app: the WSGI application to wrap (``app.wsgi_app``).
    :param state: the extension's per-app state.
    :param flask_app: the Flask app, to answer a stream whose connection was lost
        before its first chunk with its error handlers (without it, such a
        stream's error reaches the server, as any other).
    """

    def __init__(
        self, app: WSGIApplication, state: AppState, flask_app: Flask | None = None
    ) -> None:
        self.app = app
        self._state = state
        self._key = state.environ_key
        self._deferred = state.deferred
        self._flask_app = flask_app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        state = self._state
        environ[SERVING_THREAD] = get_ident()
        if self._deferred:
            run_deferred(self._deferred)
        if environ.get("CONTENT_LENGTH") or "HTTP_TRANSFER_ENCODING" in environ:
            try:
                self._take_body(environ)
            except BodyError as error:
                log_body_error(environ, error)
                if error.counter is not None:
                    self._count(error.counter)
                return error.answer(environ, start_response)
        try:
            app_iter = self.app(
                environ,
                start_response
                if self._flask_app is None
                else functools.partial(self._start_response, environ, start_response),
            )
        except BaseException as exc:
            req = environ.pop(self._key, None)
            if req is not None:
                req.end(_reason_for(exc))
            raise
        # out of the environ, which it refers to: without that cycle the request's
        # objects are freed when it is over, without the garbage collector
        req = environ.pop(self._key, None)
        if req is None:
            return app_iter
        if req.ended or (not req.streamed and not req.has_active()):
            return app_iter  # released by teardown (or nothing left to release)
        return GuardedIterable(app_iter, req, state, environ.pop(HELD_START, None))

    def _start_response(
        self,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: t.Any = None,
    ) -> t.Callable[[bytes], object]:
        """The app's ``start_response``: a streamed body's status line waits for its first
        chunk (:class:`~flask_reqconn.streamanswer.HeldStart`, made for streams only)."""
        if exc_info is None:
            req = environ.get(self._key)
            if req is None or not req.streamed:
                return start_response(status, headers)
            assert self._flask_app is not None  # passed to the app only with a Flask app
            held = environ[HELD_START] = HeldStart(start_response, environ, self._flask_app)
            return held.hold(status, headers)
        held_before: HeldStart | None = environ.get(HELD_START)
        if held_before is not None:
            held_before.drop()
        return start_response(status, headers, exc_info)

    def _take_body(self, environ: WSGIEnvironment) -> None:
        """Read the body before the app runs (eager checkout), or guard the view's reads."""
        size = body_size(environ)
        if size == 0:
            return
        settings = self._state.settings
        if settings.checkout == "eager":
            receive(environ, size, settings.body_buffer, settings.body_timeout, self._count)
        else:
            environ["wsgi.input"] = ClientBody(environ["wsgi.input"], environ, self._count)

    def _count(self, stat: Stat) -> None:
        self._state.pools[DEFAULT_POOL].counters.add(stat)


class GuardedIterable:
    """A response iterable that releases the request's leases when it ends.

    Released on ``close()`` (reason ``close`` if the body was fully produced,
    ``abort`` if not), on an exception while iterating, or by a finalizer when
    it is garbage collected without being closed. An exception that says the
    client left (see :func:`_departure`) ends the iteration instead: the
    server would log it as an error, for a client that reads nothing anyway.
    A lost database connection answers 503 before the first chunk (through
    *start*) and cuts the stream off quietly after it (:class:`StreamCut`).
    """

    __slots__ = (
        "_app_iter", "_iterator", "_req", "_state", "_exhausted", "_closed", "_reported",
        "_start", "_sent",
    )  # fmt: skip

    def __init__(
        self,
        app_iter: Iterable[bytes],
        req: RequestLeases,
        state: AppState,
        start: HeldStart | None = None,
    ) -> None:
        self._app_iter = app_iter
        self._req = req
        self._state = state
        self._exhausted = False
        self._closed = False
        #: the client's departure was logged
        self._reported = False
        #: the app's start_response (None: the server's, passed to the app as it is)
        self._start = start
        #: a chunk went to the server: the status line may be sent
        self._sent = False
        self._iterator: Iterator[bytes] = iter(app_iter)

    def __iter__(self) -> GuardedIterable:
        return self

    def __next__(self) -> bytes:
        current_owner.set(self._req)  # the body runs as its request, whatever ran in between
        try:
            chunk = next(self._iterator)
        except StopIteration:
            self._exhausted = True
            self._release_start()
            raise
        except BaseException as exc:
            req = self._req
            detail = _departure(req, exc, self._state.settings.eof_means_gone)
            if detail is None:
                lost = self._lost(exc)
                if lost is not None and (self._sent or self._start is not None):
                    return self._answer_lost(*lost)
                req.end(_reason_for(exc))
                if isinstance(exc, Exception):
                    _note_max_hold(req, exc)
                raise
            req.end(ReleaseReason.ABORT)
            if detail and not self._reported:
                _log_departure(req, detail)
            self._reported = True
            self._release_start()
            raise StopIteration from None
        if not self._sent:
            self._sent = True
            self._release_start()
        return chunk

    def _release_start(self) -> None:
        start = self._start
        if start is not None:
            start.release()

    def _lost(self, exc: BaseException) -> tuple[Lease, BaseException] | None:
        """The lease and the psycopg error if *exc* is a lost connection, else None.

        A ``DatabaseUnavailable`` is the SQLAlchemy integration's conversion of
        one (not yet counted: it leaves that to this wrapper in a stream). After
        the first chunk, a lease reclaimed by ``REQCONN_MAX_HOLD`` is left to
        :func:`_note_max_hold`.
        """
        if isinstance(exc, DatabaseUnavailable):
            cause = exc.__cause__
            lease = self._req.leases.get(exc.pool_name)
            if cause is None or lease is None:
                return None
        else:
            cause = exc
            lease = lost_lease(self._req, exc)
            if lease is None:
                return None
        if self._sent and lease.cancelled is CancelReason.MAX_HOLD:
            return None
        return lease, cause

    def _answer_lost(self, lease: Lease, cause: BaseException) -> bytes:
        """503 before the first chunk, a quiet cut after it; the leases released."""
        req, start = self._req, self._start
        if self._sent or start is None:
            req.end(ReleaseReason.EXCEPTION)
            database_unavailable(
                self._state, lease, cause, outcome="its streamed response was cut off"
            )
            raise StreamCut(lease) from cause
        self._start = None  # answered once: the answer's own chunks pass as they are
        try:
            body = start.answer(database_unavailable(self._state, lease, cause))
        finally:
            req.end(ReleaseReason.EXCEPTION)
        # the original body ended with the error: close it (stream teardown), serve the 503
        close = getattr(self._app_iter, "close", None)
        self._app_iter = body
        self._iterator = iter(body)
        if close is not None:
            close()
        return next(self)

    def close(self) -> None:
        """Close the wrapped iterable (running stream teardown), then release."""
        if self._exhausted:
            self._close(ReleaseReason.CLOSE)
            return
        req = self._req
        probe = req.probe
        if (
            not self._reported
            and not self._closed
            and req.has_active()
            and probe is not None
            and probe.gone(self._state.settings.eof_means_gone)
        ):
            self._reported = True
            _log_departure(req, "the server stopped sending it")
        self._close(ReleaseReason.ABORT)

    def _close(self, reason: ReleaseReason) -> None:
        if self._closed:
            return
        self._closed = True
        current_owner.set(self._req)  # stream teardown runs as its request too
        try:
            close = getattr(self._app_iter, "close", None)
            if close is not None:
                close()
        finally:
            self._req.end(reason)

    def __del__(self) -> None:
        if not self._closed:
            try:
                self._state.deferred.append(self._finalize)
            except Exception:  # pragma: no cover - interpreter shutdown
                pass

    def _finalize(self) -> None:
        if self._closed:
            return
        for lease in self._req.leases.values():
            if lease.active:
                self._state.pools[lease.pool_name].warn_finalized(lease)
        self._close(ReleaseReason.FINALIZER)


def _note_max_hold(req: RequestLeases, exc: Exception) -> None:
    """Say in *exc*'s traceback that ``REQCONN_MAX_HOLD`` cut the stream.

    Such a stream is not ended quietly: its client is still reading, and a body
    that ends cleanly would look complete to it. The error reaches the server,
    which breaks the connection off.
    """
    lease = next((x for x in req.leases.values() if x.cancelled is CancelReason.MAX_HOLD), None)
    if lease is not None and sys.version_info >= (3, 11):
        exc.add_note(
            f"flask-reqconn: {lease.method} {lease.path} held its connection longer than"
            " REQCONN_MAX_HOLD; its query was cancelled and the stream cut off"
        )


def run_deferred(queue: collections.deque[Callable[[], None]]) -> None:
    """Run the finalizer work queued so far (a response iterable nobody closed:
    :class:`GuardedIterable`). Never raises.

    A finalizer (``__del__``) can run in any thread, at any allocation, so it only
    appends to *queue*; this runs at a safe point: the next request, or ``stats()``.
    """
    while True:
        try:
            fn = queue.popleft()
        except IndexError:
            return
        try:
            fn()
        except Exception:
            logger.exception("error while finalizing an abandoned response")
