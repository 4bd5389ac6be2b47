"""The WSGI wrapper that releases a request's connections whatever happens.

``init_app`` wraps ``app.wsgi_app`` in :class:`LeaseGuard`. The request hooks
release connections on the normal path; this wrapper covers the rest:

- any exception (``BaseException`` included) leaving the app releases at once;
- a streamed response keeps its connection until its iterable is closed (or
  raises while iterating), which this wrapper observes;
- if nothing ever calls ``close()``, a finalizer returns the connection at the
  next safe point and logs a WARNING.
"""

from __future__ import annotations

import types
import typing as t
from collections.abc import Iterable, Iterator

from werkzeug.wsgi import ClosingIterator

from .lease import ReleaseReason, RequestLeases
from .names import CancelReason
from .probes import is_client_abort, is_file_wrapper

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from .state import AppState


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


class LeaseGuard:
    """WSGI middleware: release every lease of a request exactly once.

    :param app: the WSGI application to wrap (``app.wsgi_app``).
    :param state: the extension's per-app state.
    """

    def __init__(self, app: WSGIApplication, state: AppState) -> None:
        self.app = app
        self._state = state
        self._key = state.environ_key
        self._deferred = state.deferred

    def __call__(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        state = self._state
        if self._deferred:
            self._deferred.run()
        try:
            app_iter = self.app(environ, start_response)
        except BaseException as exc:
            req = environ.get(self._key)
            if req is not None:
                req.release_all(_reason_for(exc))
            raise
        req = environ.get(self._key)
        if req is None:
            return app_iter
        if not req.streamed and not req.has_active():
            return app_iter
        return GuardedIterable(app_iter, req, state)


class GuardedIterable:
    """A response iterable that releases the request's leases when it ends.

    Released on ``close()`` (reason ``close`` if the body was fully produced,
    ``abort`` if not), on an exception while iterating, or by a finalizer when
    it is garbage collected without being closed.
    """

    __slots__ = ("_app_iter", "_iterator", "_req", "_state", "_exhausted", "_closed")

    def __init__(self, app_iter: Iterable[bytes], req: RequestLeases, state: AppState) -> None:
        self._app_iter = app_iter
        self._req = req
        self._state = state
        self._exhausted = False
        self._closed = False
        self._iterator: Iterator[bytes] = iter(app_iter)

    def __iter__(self) -> GuardedIterable:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._iterator)
        except StopIteration:
            self._exhausted = True
            raise
        except BaseException as exc:
            gone = any(
                lease.cancelled is CancelReason.CLIENT_GONE for lease in self._req.leases.values()
            )
            self._req.release_all(ReleaseReason.ABORT if gone else _reason_for(exc))
            raise

    def close(self) -> None:
        """Close the wrapped iterable (running stream teardown), then release."""
        self._close(ReleaseReason.CLOSE if self._exhausted else ReleaseReason.ABORT)

    def _close(self, reason: ReleaseReason) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._app_iter, "close", None)
            if close is not None:
                close()
        finally:
            self._req.release_all(reason)

    def __del__(self) -> None:
        if not self._closed:
            try:
                self._state.deferred.defer(self._finalize)
            except Exception:  # pragma: no cover - interpreter shutdown
                pass

    def _finalize(self) -> None:
        if self._closed:
            return
        for lease in self._req.leases.values():
            if lease.active:
                self._state.pool(lease.pool_name).warn_finalized(lease)
        self._close(ReleaseReason.FINALIZER)
