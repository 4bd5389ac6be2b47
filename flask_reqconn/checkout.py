"""A request's connections: checked out, routed, and handed back by the hooks.

- :func:`checkout` takes a pool's connection for the current request. The
  client is probed right before the wait for the pool and right after it (a
  departed client is answered 499 and its connection goes straight back),
  the connection is made read-only where needed, and the watcher is armed to
  cancel its queries when the client leaves.
- :func:`read_only_checkout` routes read-only views to the read pool, with
  the fallback to the default pool.
- The request hooks (:func:`before_request` for eager checkout,
  :func:`after_request`, :func:`teardown_request`) commit (atomic mode) and
  release; :func:`on_query_canceled` turns a watcher's cancel into 499 or 503.
"""

from __future__ import annotations

import logging
import time
import typing as t

import psycopg
from flask import current_app, request
from psycopg.pq import TransactionStatus
from werkzeug.exceptions import ServiceUnavailable

from .body import BODY_LEFT_TO_VIEW
from .connection import current_owner, make_read_only
from .errors import ClientGone, ConnectionReleased, PoolExhausted, ReqConnError
from .lease import Lease, RequestLeases
from .lost import database_unavailable, lost_lease
from .middleware import body_may_use_connection
from .names import DEFAULT_POOL, CancelReason, ReleaseReason, Stat
from .probes import probe_for
from .sites import checkout_site, view_site
from .state import state_of

if t.TYPE_CHECKING:
    from flask import Request
    from werkzeug.wrappers import Response

    from .state import AppState

logger = logging.getLogger(__name__)

#: The request's leases live on the request object, not on ``g``: ``g``
#: belongs to the app context, which Flask shares between requests whenever an
#: app context is already pushed (a suspended ``stream_with_context``
#: generator, ``with app.app_context():`` around a test client).
REQUEST_ATTR = "_flask_reqconn"
#: Read once: on Python 3.11 reading an enum member through its class costs about as
#: much as a function call.
_TEARDOWN = ReleaseReason.TEARDOWN
#: What a request that ended without a connection keeps (:func:`teardown_request`).
_ENDED = RequestLeases()
_ENDED.ended = True
#: Seconds of waiting for the pool after which the client is checked again (a
#: checkout that did not wait comes microseconds after the first check).
_RECHECK_AFTER_WAIT = 0.001


def current_leases() -> RequestLeases | None:
    """The current request's leases, None if it has none yet.

    Reads the request object once (an attribute missing behind Flask's
    ``request`` proxy costs ten times more). Raises ``RuntimeError`` outside a
    request, as the proxy does.
    """
    rq = request._get_current_object()  # type: ignore[attr-defined]
    req: RequestLeases | None = getattr(rq, REQUEST_ATTR, None)
    return req


def request_leases(state: AppState, rq: Request | None = None) -> RequestLeases:
    """The current request's leases, created on first use.

    :param rq: the current request object, if the caller has it already.
    """
    if rq is None:
        rq = request._get_current_object()  # type: ignore[attr-defined]
    req: RequestLeases | None = getattr(rq, REQUEST_ATTR, None)
    if req is None:
        environ = rq.environ
        req = RequestLeases(environ, rq.endpoint, state)
        setattr(rq, REQUEST_ATTR, req)
        environ[state.environ_key] = req
        current_owner.set(req)
    elif req.ended:
        raise ConnectionReleased(
            f"{rq.method} {rq.path} has ended; it cannot check out a connection any more"
            " (a thread that outlived its request?). For background work use"
            " 'with reqconn.connection() as conn:'"
        )
    return req


def checkout(
    state: AppState,
    req: RequestLeases,
    name: str,
    *,
    site: t.Callable[[], str | None] = checkout_site,
    quiet_exhaustion: bool = False,
) -> Lease:
    """Check out *name*'s connection for this request, skipping dead clients.

    :param site: where the checkout happens, asked with leak detection on only.
    :param quiet_exhaustion: a fallback follows an exhaustion: do not count or log it.
    :raises ClientGone: the client left (499).
    :raises PoolExhausted: no connection in time (503).
    """
    if req.client_gone:
        raise ClientGone()
    holder = state.pools[name]  # raises ReqConnError for a pool not configured
    settings = state.settings
    probe = req.probe
    if probe is None:
        probe = req.probe = probe_for(req.environ)
    eof = settings.eof_means_gone
    if settings.check_client and probe.gone(eof):
        _client_gone(state, req, name)
    lease = holder.checkout(req, site=site, quiet_exhaustion=quiet_exhaustion)
    req.leases[name] = lease
    if settings.check_client and lease.wait_time > _RECHECK_AFTER_WAIT and probe.gone(eof):
        lease.release(ReleaseReason.CLIENT_GONE)
        _client_gone(state, req, name, lease)
    if holder.settings.read_only:
        make_read_only(lease.conn)
    if state.policy.cancel_armed[lease.endpoint, lease.method]:
        lease.watch_client_later(probe, eof)
    return lease


def get_conn(name: str | None = None) -> psycopg.Connection[t.Any]:
    """Return the current request's connection, checking it out if needed.

    The connection belongs to the request: do not close it or keep it after
    the request; flask-reqconn rolls back what is left open and returns it.

    The first ``get_conn()`` without a name routes the request: a read-only view's
    goes to the read pool (``REQCONN_READ_POOL``).

    :param name: the pool name; default pool when omitted.
    :raises ReqConnError: outside a request, or before ``init_app``.
    :raises PoolExhausted: no connection within ``REQCONN_TIMEOUT`` (503).
    :raises ClientGone: the client already disconnected (499), or a query of this
        request was cancelled for that.
    :raises ConnectionReleased: the request's connection was already given back, or
        the request has ended.

    After ``REQCONN_MAX_HOLD`` took the request's connection back, it raises
    werkzeug's ``ServiceUnavailable`` (503).
    """
    try:
        req = current_leases()
    except RuntimeError:
        raise ReqConnError(
            "get_conn() was called outside of a request. In a streamed response, call"
            " get_conn() in the view and use the connection in the generator, or wrap the"
            " generator with flask.stream_with_context(). In scripts and CLI commands use"
            " 'with reqconn.connection() as conn:'."
        ) from None
    if req is None or req.ended:
        req = request_leases(state_of(None))  # raises ConnectionReleased if it ended
    state = req.state
    assert state is not None  # request_leases() made req with the app's state
    read_only = False
    if name is None and not req.routed:
        read_only = state.policy.read_only[req.endpoint]
        req.route = state.settings.read_pool if read_only else DEFAULT_POOL
        req.routed = True
    lease = req.leases.get(name or req.route)
    if lease is None:
        if read_only:
            return read_only_checkout(state, req).hand_out()
        return checkout(state, req, name or DEFAULT_POOL).hand_out()
    if lease.cancelled is not None:
        req.client_gone = True
        if lease.cancelled is CancelReason.CLIENT_GONE:
            raise ClientGone()
        raise ServiceUnavailable()
    if read_only and lease.active:  # taken earlier by an explicit get_conn(name)
        make_read_only(lease.conn)
    return lease.hand_out()


def read_only_checkout(state: AppState, req: RequestLeases) -> Lease:
    """Check out for a read-only view: the read pool (or its fallback), read-only."""
    read_pool = state.settings.read_pool
    fallback = state.settings.read_fallback and read_pool != DEFAULT_POOL
    req.route = read_pool
    try:
        lease = checkout(state, req, read_pool, quiet_exhaustion=fallback)
    except PoolExhausted:
        if not fallback:
            raise
        state.pools[read_pool].counters.add(Stat.FALLBACKS)
        logger.debug(
            "read pool %r exhausted: %s %s falls back to the default pool",
            read_pool,
            request.method,
            request.path,
        )
        req.route = DEFAULT_POOL
        lease = checkout(state, req, DEFAULT_POOL)
    make_read_only(lease.conn)
    return lease


def _client_gone(
    state: AppState, req: RequestLeases, name: str, waited_for: Lease | None = None
) -> t.NoReturn:
    """Count and log a client found gone at the checkout of pool *name*; raise 499.

    :param waited_for: the lease, when the client left during a wait for the pool.
    """
    req.client_gone = True
    state.pools[name].counters.add(Stat.CLIENT_GONE)
    waited = f" after waiting {waited_for.wait_time:.3f} s for a connection" if waited_for else ""
    logger.info(
        "client gone before its connection was used: %s %s%s; answered 499",
        request.method,
        request.path,
        waited,
    )
    raise ClientGone()


def on_query_canceled(state: AppState, exc: psycopg.errors.QueryCanceled) -> t.Any:
    """Error handler: a query the watcher cancelled becomes a 499 (or 503).

    Other cancellations (``statement_timeout``...) are re-raised untouched.
    """
    req = current_leases()
    lease = next((lease for lease in (req.leases.values() if req else ()) if lease.cancelled), None)
    if req is None or lease is None:
        raise exc
    req.client_gone = True
    if lease.cancelled is CancelReason.MAX_HOLD:
        return ServiceUnavailable(
            "The request held its database connection longer than allowed and was stopped.",
            retry_after=state.pools[lease.pool_name].settings.retry_after,
        )
    state.pools[lease.pool_name].counters.add(Stat.CLIENT_GONE)
    logger.info(
        "client gone: %s %s; its query was cancelled; the client had waited %.3f s; answered 499",
        lease.method,
        lease.path,
        (lease.released_at or time.monotonic()) - lease.requested_at,
    )
    return ClientGone()


def on_operational_error(state: AppState, exc: psycopg.OperationalError) -> t.Any:
    """Error handler: a connection lost mid-request becomes a 503 (:class:`DatabaseUnavailable`).

    Any other ``OperationalError`` is re-raised untouched (:mod:`flask_reqconn.lost`
    says what is lost). One WARNING per pool and second names the cause; the rest
    of a burst is counted in it.
    """
    lease = lost_lease(current_leases(), exc)
    if lease is None:
        raise exc
    # through the app's own handler for DatabaseUnavailable, if it has one
    return current_app.handle_http_exception(database_unavailable(state, lease, exc))


# -- request hooks ------------------------------------------------------------------


def before_request(state: AppState) -> None:
    """Eager mode: check out the default pool's connection before the view."""
    rq = request._get_current_object()  # type: ignore[attr-defined]
    if (
        state.policy.eager[rq.endpoint]
        and rq.routing_exception is None
        and BODY_LEFT_TO_VIEW not in rq.environ
    ):
        req = request_leases(state, rq)
        req.routed = True  # eager views are never read-only: get_conn() is the default pool
        checkout(state, req, DEFAULT_POOL, site=view_site)


def after_request(state: AppState, response: Response) -> Response:
    """Keep a streamed body's connection for the WSGI wrapper; commit in atomic mode."""
    streamed = response.is_streamed and body_may_use_connection(response.response)
    if not (streamed or state.any_atomic):
        return response  # the common case: nothing to keep, nothing to commit
    req = current_leases()
    if streamed:
        if req is None:  # the body may check out: the WSGI wrapper guards it
            req = request_leases(state)
        req.streamed = True
    if state.any_atomic and req is not None:
        current_owner.set(req)  # the view may have checked out in another thread (async)
        _commit_atomic(state, req, response.status_code)
    return response


def teardown_request(state: AppState, exc: BaseException | None = None) -> None:
    """Release the request's connections (not a streamed body's). Never raises.

    A request that had none is marked as ended too: it checks out nothing more.
    """
    rq = request._get_current_object()  # type: ignore[attr-defined]
    req: RequestLeases | None = getattr(rq, REQUEST_ATTR, None)
    if req is None:
        setattr(rq, REQUEST_ATTR, _ENDED)
        return
    if req.streamed:
        # The body is not produced yet (Flask runs teardown before a
        # stream_with_context body, and again at its end): the WSGI
        # wrapper releases when the response iterable is closed.
        return
    try:
        req.end(_TEARDOWN)
    except Exception:  # teardown must never raise
        logger.exception("error while releasing connections in teardown")


def _commit_atomic(state: AppState, req: RequestLeases, status: int) -> None:
    if status >= 400:
        return  # rolled back at release
    for lease in req.leases.values():
        conn = lease.conn
        if not lease.active or conn is None:
            continue
        if state.pools[lease.pool_name].settings.transaction != "atomic":
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
