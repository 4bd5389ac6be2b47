"""The Flask extension: configuration, request hooks and :func:`get_conn`."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import time
import typing as t
from collections.abc import Callable, Iterator

import psycopg
from flask import Blueprint, Flask, current_app, has_request_context, request
from psycopg.pq import TransactionStatus
from werkzeug.exceptions import ServiceUnavailable

from .cli import make_cli
from .clientgone import ClientProbe
from .config import DEFAULTS, SAFE_METHODS, Settings, load_pool_settings
from .errors import ClientGone, ConnectionReleased, PoolExhausted, ReqConnError
from .handback import make_read_only
from .lease import Lease, ReleaseReason, RequestLeases
from .middleware import LeaseGuard, body_may_use_connection
from .pool import PoolHolder
from .watcher import get_watcher

if t.TYPE_CHECKING:
    from werkzeug.wrappers import Response

logger = logging.getLogger(__name__)

EXTENSION_KEY = "reqconn"
DEFAULT_POOL = "default"
#: The request's leases live on the request object, not on ``g``: ``g``
#: belongs to the app context, which Flask shares between requests whenever an
#: app context is already pushed (a suspended ``stream_with_context``
#: generator, ``with app.app_context():`` around a test client).
_REQUEST_ATTR = "_flask_reqconn"
_EXEMPT_ATTR = "_flask_reqconn_exempt"
#: Seconds of waiting for the pool after which the client is checked again (a
#: checkout that did not wait comes microseconds after the first check).
_RECHECK_AFTER_WAIT = 0.001
_CANCEL_ATTR = "_flask_reqconn_cancel_on_disconnect"
_READ_ONLY_ATTR = "_flask_reqconn_read_only"

F = t.TypeVar("F", bound=Callable[..., t.Any] | Blueprint)


class ReqConn:
    """Give every request one PostgreSQL connection from a psycopg pool.

    ``ReqConn(app)`` or ``ReqConn()`` and later :meth:`init_app` (app
    factories). One instance may serve several apps; each app has its own
    pool, opened lazily in the process that serves requests.

    :param app: the Flask app to set up now, if any.
    """

    def __init__(self, app: Flask | None = None) -> None:
        self._exempt_views: set[Callable[..., t.Any]] = set()
        self._exempt_blueprints: set[str] = set()
        self._read_only_blueprints: set[str] = set()
        if app is not None:
            self.init_app(app)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"

    def init_app(self, app: Flask) -> None:
        """Read the ``REQCONN_*`` config, register the hooks, wrap ``app.wsgi_app``.

        Nothing is connected here: the pool opens on the first request in
        the serving process.

        :raises ConfigError: a key is missing or invalid; the message names it.
        :raises RuntimeError: the app already has a ``ReqConn``.
        """
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                "A 'ReqConn' instance has already been registered on this Flask app."
                " Import and use that instance instead."
            )
        pools = load_pool_settings(app.config, app.name)
        settings = pools[DEFAULT_POOL]
        for key, value in DEFAULTS.items():
            if value is not None:
                app.config.setdefault(key, value)
        state = AppState(self, app.name, pools)
        state.read_pool = app.config.get("REQCONN_READ_POOL") or DEFAULT_POOL
        state.read_fallback = bool(app.config.get("REQCONN_READ_FALLBACK", False))
        app.extensions[EXTENSION_KEY] = state
        if settings.checkout == "eager":
            app.before_request(state.before_request)
        app.after_request(state.after_request)
        app.teardown_request(state.teardown_request)
        app.wsgi_app = LeaseGuard(app.wsgi_app, state)  # type: ignore[method-assign]
        app.cli.add_command(make_cli())
        if settings.cancel_on_disconnect != "off" or settings.max_hold is not None:
            app.register_error_handler(psycopg.errors.QueryCanceled, state.on_query_canceled)

    def exempt(self, view: F) -> F:
        """Exempt a view function or a blueprint from the eager checkout.

        Usable as a decorator. Static files (endpoints ``static`` and
        ``<blueprint>.static``) are always exempt. An exempt view still gets a connection if it
        calls :func:`get_conn` (lazily, on that call).
        """
        if isinstance(view, Blueprint):
            self._exempt_blueprints.add(view.name)
        else:
            self._exempt_views.add(t.cast(Callable[..., t.Any], view))
            with contextlib.suppress(AttributeError, TypeError):
                setattr(view, _EXEMPT_ATTR, True)
        return view

    def read_only(self, view: F) -> F:
        """Mark a view or a blueprint as read-only (usable as a decorator).

        Its ``get_conn()`` checks out from ``REQCONN_READ_POOL`` (a replica;
        the default pool when unset), falling back to the default pool when
        that pool is exhausted and ``REQCONN_READ_FALLBACK`` is True, and the
        connection is made read-only, so an accidental write fails loudly
        (``psycopg.errors.ReadOnlySqlTransaction``).
        """
        if isinstance(view, Blueprint):
            self._read_only_blueprints.add(view.name)
        else:
            setattr(view, _READ_ONLY_ATTR, True)
        return view

    def cancel_on_disconnect(self, enabled: bool = True) -> Callable[[F], F]:
        """Decorator: override ``REQCONN_CANCEL_ON_DISCONNECT`` for one view.

        ``@reqconn.cancel_on_disconnect()`` arms cancellation for a view whose
        method the policy leaves alone (a POST whose work is all in the
        database, rolled back when cancelled); ``@reqconn.cancel_on_disconnect(False)``
        keeps a view's queries running when its client leaves.
        """

        def decorate(view: F) -> F:
            setattr(view, _CANCEL_ATTR, enabled)
            return view

        return decorate

    def stats(self, app: Flask | None = None) -> dict[str, t.Any]:
        """Counters of this process for *app* (default: the current app).

        Keys: ``pid``, ``checked_out`` (leases held now), ``checkouts``,
        ``releases`` (by reason), ``exhausted`` (503s), ``client_gone``
        (499s), ``discarded_writes``, ``leak_warnings``, ``cancelled``
        (queries of departed clients), ``reclaimed`` (``REQCONN_MAX_HOLD``),
        and ``pools`` with each pool's own counters, wait and hold time
        histograms, current holders and psycopg_pool's ``get_stats()``.
        See the operations page for every key.
        """
        return _state_of(app).stats()

    def close(self, app: Flask | None = None) -> None:
        """Close this process's pools for *app*; they reopen on next use."""
        _state_of(app).close()

    def health_blueprint(self, *, name: str = "reqconn_health") -> Blueprint:
        """An exempt blueprint with ``/health``, ``/ready`` and ``/stats``.

        See :func:`flask_reqconn.health.health_blueprint`.
        """
        from .health import health_blueprint

        return health_blueprint(self, name=name)

    @contextlib.contextmanager
    def connection(
        self, name: str | None = None, *, app: Flask | None = None, timeout: float | None = None
    ) -> Iterator[psycopg.Connection[t.Any]]:
        """A pool connection outside of requests (CLI commands, scripts, tests).

        The transaction is committed on success and rolled back on error,
        as with psycopg_pool's ``connection()``; then the connection is reset
        like a request's before it goes back.

        :param timeout: seconds to wait for a connection (default ``REQCONN_TIMEOUT``).
        :raises PoolExhausted: no connection in time.
        """
        holder = _state_of(app).holder(name or DEFAULT_POOL)
        with holder.connection(timeout=timeout) as conn:
            yield conn


class AppState:
    """Everything flask-reqconn keeps for one app (``app.extensions["reqconn"]``)."""

    def __init__(self, ext: ReqConn, app_name: str, pools: dict[str, Settings]) -> None:
        self.ext = ext
        self.app_name = app_name
        self.settings = pools[DEFAULT_POOL]
        #: the pool of read-only views, and whether they may fall back to the default
        self.read_pool = DEFAULT_POOL
        self.read_fallback = False
        self._read_only_by_endpoint: dict[str | None, bool] = {}
        self.environ_key = f"flask_reqconn.request.{id(self):x}"
        self._deferred: collections.deque[Callable[[], None]] = collections.deque()
        self.holders: dict[str, PoolHolder] = {
            name: PoolHolder(
                name,
                pool_settings,
                label=f"reqconn:{app_name}" + ("" if name == DEFAULT_POOL else f":{name}"),
                deferred=self._deferred,
            )
            for name, pool_settings in pools.items()
        }
        self._eager_by_endpoint: dict[str | None, bool] = {}
        self._cancel_armed_by: dict[tuple[str | None, str], bool] = {}
        #: some pool commits after the view (REQCONN_TRANSACTION = "atomic")
        self.any_atomic = any(p.transaction == "atomic" for p in pools.values())

    def __repr__(self) -> str:
        return f"<AppState {self.app_name!r} {self.settings.checkout}>"

    def holder(self, name: str) -> PoolHolder:
        try:
            return self.holders[name]
        except KeyError:
            raise ReqConnError(
                f"no pool named {name!r}; configured pools: {', '.join(sorted(self.holders))}"
            ) from None

    # -- deferred finalizers (run at safe points) ---------------------------

    @property
    def has_deferred(self) -> bool:
        return bool(self._deferred)

    def defer(self, fn: Callable[[], None]) -> None:
        self._deferred.append(fn)

    def run_deferred(self) -> None:
        self.holders[DEFAULT_POOL].run_deferred()  # the queue is shared by all pools

    # -- request hooks ----------------------------------------------------------

    def before_request(self) -> None:
        """Eager mode: check out the default pool's connection before the view."""
        endpoint = request.endpoint
        eager = self._eager_by_endpoint.get(endpoint)
        if eager is None:
            eager = self._decide_eager(endpoint)
        if eager and request.routing_exception is None:
            req = self.request_leases()
            req.routed = True  # eager views are never read-only: get_conn() is the default pool
            self.checkout(req, DEFAULT_POOL)

    def _decide_eager(self, endpoint: str | None) -> bool:
        eager = (
            endpoint is not None
            and endpoint not in self.settings.exempt_endpoints
            and endpoint != "static"
            and not endpoint.endswith(".static")
        )
        if eager:
            view = current_app.view_functions.get(t.cast(str, endpoint))
            if view is not None and (
                view in self.ext._exempt_views or getattr(view, _EXEMPT_ATTR, False)
            ):
                eager = False
            elif any(
                name.rpartition(".")[2] in self.ext._exempt_blueprints
                for name in request.blueprints
            ):
                eager = False
            elif self.is_read_only(endpoint):
                eager = False  # routed to the read pool, lazily
        self._eager_by_endpoint[endpoint] = eager
        return eager

    def is_read_only(self, endpoint: str | None) -> bool:
        """Is this endpoint's view marked with :meth:`ReqConn.read_only`?"""
        known = self._read_only_by_endpoint.get(endpoint)
        if known is not None:
            return known
        view = current_app.view_functions.get(endpoint or "")
        read_only = bool(getattr(view, _READ_ONLY_ATTR, False)) or any(
            name.rpartition(".")[2] in self.ext._read_only_blueprints
            for name in request.blueprints
        )
        self._read_only_by_endpoint[endpoint] = read_only
        return read_only

    def read_only_checkout(self, req: RequestLeases) -> Lease:
        """Check out for a read-only view: the read pool (or its fallback), read-only."""
        req.route = self.read_pool
        fallback = self.read_fallback and self.read_pool != DEFAULT_POOL
        try:
            lease = self.checkout(req, self.read_pool, quiet_exhaustion=fallback)
        except PoolExhausted:
            if not self.read_fallback or self.read_pool == DEFAULT_POOL:
                raise
            self.holders[self.read_pool].counters.add("fallbacks")
            logger.debug(
                "read pool %r exhausted: %s %s falls back to the default pool",
                self.read_pool,
                request.method,
                request.path,
            )
            req.route = DEFAULT_POOL
            lease = self.checkout(req, DEFAULT_POOL)
        make_read_only(lease.conn)
        return lease

    def after_request(self, response: Response) -> Response:
        req: RequestLeases | None = getattr(request, _REQUEST_ATTR, None)
        if req is None:
            return response
        if response.is_streamed and body_may_use_connection(response.response):
            req.streamed = True
        if self.any_atomic:
            self._commit_atomic(req, response.status_code)
        return response

    def teardown_request(self, exc: BaseException | None = None) -> None:
        req: RequestLeases | None = getattr(request, _REQUEST_ATTR, None)
        if req is None:
            return
        if req.streamed:
            # The body is not produced yet (Flask runs teardown before a
            # stream_with_context body, and again at its end): the WSGI
            # wrapper releases when the response iterable is closed.
            return
        try:
            req.release_all(ReleaseReason.TEARDOWN)
        except Exception:  # teardown must never raise
            logger.exception("error while releasing connections in teardown")

    def _commit_atomic(self, req: RequestLeases, status: int) -> None:
        if status >= 400:
            return  # rolled back at release
        for lease in req.leases.values():
            conn = lease.conn
            if not lease.active or conn is None:
                continue
            if self.holders[lease.pool_name].settings.transaction != "atomic":
                continue
            tx = conn.pgconn.transaction_status
            if tx == TransactionStatus.INTRANS:
                conn.commit()
            elif tx == TransactionStatus.INERROR:
                raise ReqConnError(
                    f"REQCONN_TRANSACTION is 'atomic' but the transaction of pool"
                    f" {lease.pool_name!r} failed earlier in this request and cannot be"
                    " committed; nothing was saved"
                )

    # -- checkout ---------------------------------------------------------------

    def request_leases(self) -> RequestLeases:
        req: RequestLeases | None = getattr(request, _REQUEST_ATTR, None)
        if req is None:
            req = RequestLeases()
            setattr(request._get_current_object(), _REQUEST_ATTR, req)  # type: ignore[attr-defined]
            request.environ[self.environ_key] = req
        return req

    def checkout(self, req: RequestLeases, name: str, *, quiet_exhaustion: bool = False) -> Lease:
        """Check out *name*'s connection for this request, skipping dead clients."""
        if req.client_gone:
            raise ClientGone()
        holder = self.holder(name)
        rq = request._get_current_object()  # type: ignore[attr-defined]
        environ = rq.environ
        settings = self.settings
        probe = req.probe
        if probe is None:
            probe = req.probe = ClientProbe(environ)
        eof = settings.eof_means_gone
        if settings.check_client and probe.gone(eof):
            self._client_gone(req, None)
        method = environ.get("REQUEST_METHOD", "")
        endpoint = rq.endpoint
        lease = holder.checkout(
            method=method,
            path=environ.get("PATH_INFO", ""),
            endpoint=endpoint,
            site=_checkout_site,
            quiet_exhaustion=quiet_exhaustion,
        )
        req.leases[name] = lease
        if settings.check_client and lease.wait_time > _RECHECK_AFTER_WAIT and probe.gone(eof):
            lease.release(ReleaseReason.CLIENT_GONE)
            self._client_gone(req, lease)
        if holder.settings.read_only:
            make_read_only(lease.conn)
        if settings.cancel_on_disconnect != "off":
            armed = self._cancel_armed_by.get((endpoint, method))
            if armed is None:
                armed = self._cancel_armed(endpoint, method)
            if armed:
                get_watcher().watch_client_later(lease, probe, eof_means_gone=eof)
        return lease

    def _cancel_armed(self, endpoint: str | None, method: str) -> bool:
        """Should this request's queries be cancelled when its client leaves?"""
        view = current_app.view_functions.get(endpoint or "")
        override = getattr(view, _CANCEL_ATTR, None)
        if override is not None:
            armed = bool(override)
        else:
            armed = self.settings.cancel_on_disconnect == "all" or method in SAFE_METHODS
        self._cancel_armed_by[(endpoint, method)] = armed
        return armed

    def on_query_canceled(self, exc: psycopg.errors.QueryCanceled) -> t.Any:
        """Error handler: a query the watcher cancelled becomes a 499 (or 503).

        Other cancellations (``statement_timeout``...) are re-raised untouched.
        """
        req: RequestLeases | None = getattr(request, _REQUEST_ATTR, None)
        lease = next(
            (lease for lease in (req.leases.values() if req else ()) if lease.cancelled), None
        )
        if req is None or lease is None:
            raise exc
        req.client_gone = True
        if lease.cancelled == "max_hold":
            return ServiceUnavailable(
                "The request held its database connection longer than allowed and was stopped."
            )
        self.holders[lease.pool_name].counters.add("client_gone")
        logger.info(
            "client gone: %s %s; its query was cancelled; the client had waited %.3f s;"
            " answered 499",
            lease.method,
            lease.path,
            (lease.released_at or time.monotonic()) - lease.requested_at,
        )
        return ClientGone()

    def _client_gone(self, req: RequestLeases, lease: Lease | None) -> t.NoReturn:
        req.client_gone = True
        holder = self.holders[lease.pool_name if lease else DEFAULT_POOL]
        holder.counters.add("client_gone")
        waited = f" after waiting {lease.wait_time:.3f} s for a connection" if lease else ""
        logger.info(
            "client gone before its connection was used: %s %s%s; answered 499",
            request.method,
            request.path,
            waited,
        )
        raise ClientGone()

    # -- reporting ----------------------------------------------------------------

    def stats(self) -> dict[str, t.Any]:
        pools = {name: holder.stats() for name, holder in self.holders.items()}
        releases = {reason.value: 0 for reason in ReleaseReason}
        for data in pools.values():
            for reason, n in data["releases"].items():
                releases[reason] += n
        return {
            "pid": os.getpid(),
            "checked_out": sum(p["checked_out"] for p in pools.values()),
            "checkouts": sum(p["checkouts"] for p in pools.values()),
            "releases": releases,
            "exhausted": sum(p["exhausted"] for p in pools.values()),
            "client_gone": sum(p["client_gone"] for p in pools.values()),
            "leak_warnings": sum(p["leak_warnings"] for p in pools.values()),
            "cancelled": sum(p["cancelled"] for p in pools.values()),
            "reclaimed": sum(p["reclaimed"] for p in pools.values()),
            "fallbacks": sum(p["fallbacks"] for p in pools.values()),
            "discarded_writes": sum(p["discarded_writes"] for p in pools.values()),
            "pools": pools,
        }

    def close(self) -> None:
        for holder in self.holders.values():
            holder.close()


_SITE_SKIP = (
    f"{os.sep}flask{os.sep}",
    f"{os.sep}werkzeug{os.sep}",
    f"{os.sep}flask_reqconn{os.sep}",
    f"{os.sep}gunicorn{os.sep}",
    f"{os.sep}waitress{os.sep}",
    f"{os.sep}gevent{os.sep}",
    f"{os.sep}click{os.sep}",
    f"{os.sep}threading.py",
    f"{os.sep}socketserver.py",
)


def _checkout_site() -> str | None:
    """Where the connection was taken: the app's frames inside the view, else the view.

    Only called with leak detection on. Walks frames outward from here without
    reading source lines (cheap enough for every checkout).
    """
    found: list[str] = []
    frame = sys._getframe(1)
    for _ in range(60):
        if frame is None:
            break
        code = frame.f_code
        filename = code.co_filename
        if f"{os.sep}flask{os.sep}" in filename and code.co_name in _DISPATCH_FRAMES:
            if found:
                return " <- ".join(found[:3])
            break
        if not any(p in filename for p in _SITE_SKIP):
            found.append(f"{os.path.basename(filename)}:{frame.f_lineno} in {code.co_name}")
        frame = frame.f_back  # type: ignore[assignment]
    view = current_app.view_functions.get(request.endpoint or "")
    view_code = getattr(view, "__code__", None)
    if view_code is None:
        return None
    name = getattr(view, "__qualname__", "?")
    return f"{view_code.co_filename}:{view_code.co_firstlineno} in {name} (view, eager checkout)"


#: Flask frames right above user code: the view call, a streamed body.
_DISPATCH_FRAMES = frozenset({"dispatch_request", "generator"})


def _state_of(app: Flask | None) -> AppState:
    if app is None:
        try:
            app = current_app._get_current_object()  # type: ignore[attr-defined]
        except RuntimeError:
            raise ReqConnError(
                "no app given and no application context is active: pass the app,"
                " or use 'with app.app_context():'"
            ) from None
    state = t.cast(Flask, app).extensions.get(EXTENSION_KEY)
    if state is None:
        raise ReqConnError(
            f"flask-reqconn is not set up on app {t.cast(Flask, app).name!r}."
            " Did you forget to call ReqConn(app) or reqconn.init_app(app)?"
        )
    return t.cast(AppState, state)


def get_conn(name: str | None = None) -> psycopg.Connection[t.Any]:
    """Return the current request's connection, checking it out if needed.

    The connection belongs to the request: do not close it or keep it after
    the request; flask-reqconn rolls back what is left open and returns it.

    :param name: the pool name; default pool when omitted.
    :raises ReqConnError: outside a request, or before ``init_app``.
    :raises PoolExhausted: no connection within ``REQCONN_TIMEOUT`` (503).
    :raises ClientGone: the client already disconnected (499).
    """
    try:
        req: RequestLeases | None = getattr(request, _REQUEST_ATTR, None)
    except RuntimeError:
        req = None
    if req is not None and (name is not None or req.routed):
        lease = req.leases.get(name or req.route)
        if (
            lease is not None
            and lease.handle is not None
            and lease.active
            and lease.cancelled is None
        ):
            lease.handed_out = True
            return lease.handle
    return _get_conn_slow(name, req)


def _get_conn_slow(name: str | None, req: RequestLeases | None) -> psycopg.Connection[t.Any]:
    if not has_request_context():
        raise ReqConnError(
            "get_conn() was called outside of a request. In a streamed response, call"
            " get_conn() in the view and use the connection in the generator, or wrap the"
            " generator with flask.stream_with_context(). In scripts and CLI commands use"
            " 'with reqconn.connection() as conn:'."
        )
    state = _state_of(None)
    if req is None:
        req = state.request_leases()
    read_only = name is None and state.is_read_only(request.endpoint)
    if name is None and not req.routed:
        req.route = state.read_pool if read_only else DEFAULT_POOL
        req.routed = True
    lease = req.leases.get(name or req.route)
    if lease is not None:
        if (
            lease.active
            and lease.cancelled is None
            and lease.conn is not None
            and lease.handle is not None
        ):
            if read_only:  # taken earlier by an explicit get_conn(name)
                make_read_only(lease.conn)
            lease.handed_out = True
            return lease.handle
        if lease.cancelled is not None:
            req.client_gone = True
            raise ClientGone() if lease.cancelled == "client_gone" else ServiceUnavailable()
        raise ConnectionReleased(
            f"the connection of pool {lease.pool_name!r} for this request was already given"
            f" back (released by {lease.released_by}); it cannot be used after that"
        )
    if read_only:
        lease = state.read_only_checkout(req)
    else:
        lease = state.checkout(req, name or DEFAULT_POOL)
    assert lease.handle is not None
    lease.handed_out = True
    return lease.handle
