"""A lost database connection: what counts as one, and the 503 it becomes.

A request's connection is *lost* when its server side went away while the
request used it: the backend was terminated, the server restarted or crashed,
the network path failed, or the watcher shut its socket down
(``REQCONN_MAX_HOLD`` on a server a cancel cannot reach). psycopg then raises
an ``OperationalError`` and marks the connection closed (``broken``); the
SQLSTATE, when the server sent one, is of class ``08`` (connection exception)
or ``57P`` (operator intervention: ``admin_shutdown``, ``crash_shutdown``,
``idle_session_timeout``...). Any other ``OperationalError`` (a lock not
available, a cancelled statement, a pool timeout) is not a lost connection.

Three places answer a lost connection with :class:`~flask_reqconn.DatabaseUnavailable`,
all through :func:`database_unavailable` (counted, one rate-limited WARNING per
pool and second): the Flask error handler (``get_conn()`` in a view), the WSGI
wrapper (a streamed body, :mod:`flask_reqconn.middleware`) and the SQLAlchemy
integration (which sees psycopg's error inside SQLAlchemy's). None of them
imports SQLAlchemy here.
"""

from __future__ import annotations

import typing as t

import psycopg

from .errors import DatabaseUnavailable
from .names import Stat

if t.TYPE_CHECKING:
    from .lease import Lease, RequestLeases
    from .state import AppState

#: SQLSTATE prefixes of a lost connection: connection exceptions, operator intervention.
LOST_SQLSTATES = ("08", "57P")


def is_lost(exc: BaseException, conn: psycopg.Connection[t.Any] | None = None) -> bool:
    """Does *exc* say that *conn* (the connection it came from, if known) was lost?"""
    if not isinstance(exc, psycopg.OperationalError):
        return False
    if conn is not None and (conn.closed or conn.broken):
        return True
    return (exc.sqlstate or "").startswith(LOST_SQLSTATES)


def lost_lease(req: RequestLeases | None, exc: BaseException) -> Lease | None:
    """The lease of *req* whose connection *exc* says was lost, or None.

    A lease whose socket the watcher shut down, or whose connection psycopg
    marked closed or broken, comes first; a lost-connection SQLSTATE on a
    connection that still looks open picks the request's first connection.
    """
    if req is None or not isinstance(exc, psycopg.OperationalError):
        return None
    leases = req.leases.values()
    for lease in leases:
        conn = lease.conn
        if lease.severed or (conn is not None and (conn.closed or conn.broken)):
            return lease
    if is_lost(exc):
        return next((lease for lease in leases if lease.conn is not None), None)
    return None


def database_unavailable(
    state: AppState,
    lease: Lease,
    exc: BaseException,
    *,
    outcome: str = "answered 503",
    report: bool = True,
) -> DatabaseUnavailable:
    """Count and report *lease*'s lost connection; the 503 to answer it with.

    :param outcome: what the request got, for the WARNING.
    :param report: False: neither counted nor logged here (the caller leaves that to
        the WSGI wrapper, which sees the error again in a streamed body).
    """
    holder = state.pools[lease.pool_name]
    if report:
        holder.counters.add(Stat.CONNECTION_LOST)
        holder.log_connection_lost(lease, exc, outcome=outcome)
    error = DatabaseUnavailable(lease.pool_name, holder.settings.retry_after)
    error.__cause__ = exc
    return error
