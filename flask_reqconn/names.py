"""Names declared once: the default pool, the counter keys, why a query was cancelled
and who released a connection.

Everything else (the counters, the per-app sum, the Prometheus metrics, the
docs' stats tables) iterates over these.
"""

from __future__ import annotations

import enum

#: The pool of the ``REQCONN_*`` keys; named pools come from ``REQCONN_POOLS``.
DEFAULT_POOL = "default"
#: The key of the per-app state in ``app.extensions``.
EXTENSION_KEY = "reqconn"
#: The environ key of the thread serving the request (the WSGI server's), recorded by
#: the WSGI wrapper: an ``async def`` view runs in asgiref's thread, and its leases
#: still name this one (leak reports, ``stats()`` holders).
SERVING_THREAD = "flask_reqconn.thread"


def config_key(pool: str, key: str) -> str:
    """The configuration key that sets *key* (``"MAX_SIZE"``) for the pool named *pool*.

    ``REQCONN_MAX_SIZE`` for the default pool, ``REQCONN_POOLS['replica']['MAX_SIZE']``
    for a named one: what messages tell the user to change.
    """
    return f"REQCONN_{key}" if pool == DEFAULT_POOL else f"REQCONN_POOLS[{pool!r}][{key!r}]"


class Stat(str, enum.Enum):
    """The event counters of one pool, as keys of :meth:`~flask_reqconn.ReqConn.stats`.

    Bumped with ``PoolCounters.add()`` (:mod:`flask_reqconn.pool`); summed
    over the pools at the top level of the stats.
    """

    #: requests answered 503: no connection in time, or the wait queue was full
    EXHAUSTED = "exhausted"
    #: requests answered 503: no connection in time while the database refused new
    #: connections or could not be reached (not counted in ``exhausted``)
    REFUSED = "refused"
    #: requests answered 499: the client had left (before its connection was used, or
    #: while it sent its body)
    CLIENT_GONE = "client_gone"
    #: requests answered 408: the client stopped sending its body for ``REQCONN_BODY_TIMEOUT``
    STALLED = "stalled"
    #: hand-backs whose rollback threw away uncommitted writes
    DISCARDED_WRITES = "discarded_writes"
    #: connections closed at hand-back instead of being reused
    DISCARDED_CONNECTIONS = "discarded_connections"
    #: leases held longer than ``REQCONN_LEAK_THRESHOLD``
    LEAK_WARNINGS = "leak_warnings"
    #: connections returned by the finalizer (nothing closed the response)
    FINALIZED = "finalized"
    #: queries cancelled because their client disconnected
    CANCELLED = "cancelled"
    #: leases cancelled for exceeding ``REQCONN_MAX_HOLD``
    RECLAIMED = "reclaimed"
    #: read-only requests sent to the default pool (``REQCONN_READ_FALLBACK``)
    FALLBACKS = "fallbacks"
    #: pooled connections found dead at checkout (server side gone), never handed out
    DEAD_DISCARDED = "dead_discarded"
    #: requests answered 503 because their connection was lost while they ran, and
    #: streamed responses cut off for it after their first chunk
    CONNECTION_LOST = "connection_lost"

    def __str__(self) -> str:
        return self.value


class CancelReason(str, enum.Enum):
    """Why the watcher cancelled a lease's query (the lease's ``cancelled``)."""

    #: the request's HTTP client disconnected (answered 499)
    CLIENT_GONE = "client_gone"
    #: the lease was held longer than ``REQCONN_MAX_HOLD`` (answered 503)
    MAX_HOLD = "max_hold"

    def __str__(self) -> str:
        return self.value


class ReleaseReason(str, enum.Enum):
    """Who gave a connection back. Used in :meth:`ReqConn.stats` and logs."""

    #: ``teardown_request`` after the view (the normal path).
    TEARDOWN = "teardown"
    #: ``close()`` of a fully sent streamed response.
    CLOSE = "close"
    #: a client-disconnect error, or a stream closed before it was fully sent.
    ABORT = "abort"
    #: an exception left the app or the stream while the lease was still held
    #: (teardown did not run or did not release: another teardown function
    #: raised, an error in a ``before_request`` of an outer layer, an error
    #: raised while the body was produced).
    EXCEPTION = "exception"
    #: the client was gone right after the pool wait; the request ended (499).
    CLIENT_GONE = "client_gone"
    #: nobody closed the response; a finalizer returned the connection.
    FINALIZER = "finalizer"

    def __str__(self) -> str:
        return self.value
