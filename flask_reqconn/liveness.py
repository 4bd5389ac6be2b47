"""Is the server side of a pooled connection still there, and how soon to reconnect.

An idle connection whose backend ended (``pg_terminate_backend``,
``idle_session_timeout``, a restart, a failover, a proxy restart) still looks
fine to psycopg until it is used: its socket, though, is readable at once and
holds a ``FATAL`` ErrorResponse or an EOF. A healthy idle connection has
nothing to read, or only asynchronous messages (a pending ``NOTIFY``, a
ParameterStatus, a notice). :func:`server_gone` tells the two apart without a
round trip and without consuming anything, so psycopg still sees every byte.

psycopg_pool reconnects with an exponential back-off (1 s, doubling, up to
``reconnect_timeout``): after an outage of 40 s its next attempt can be tens of
seconds away. :class:`RequestPool` caps the delay between attempts, with
jitter, so a pool serves again within about a second of the server coming back.

psycopg_pool logs a WARNING for every closed connection given back to it
(``discarding closed connection``, ``_return_connection``): during an outage,
one line per request. flask-reqconn closes the connections it discards itself
and reports them in its own counters and rate-limited WARNINGs, so
:meth:`RequestPool.putconn` replaces a closed connection without that line.

It also logs a WARNING for every failed connection attempt. ``RequestPool``
reports each attempt to its :class:`~flask_reqconn.attempts.ConnectAttempts` instead,
which says once per burst that the database refuses connections, and why.
"""

from __future__ import annotations

import errno
import os
import socket
import typing as t
import weakref

import psycopg
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool
from psycopg_pool.base import AttemptWithBackoff, BasePool
from psycopg_pool.pool import AddConnection

from .attempts import ConnectAttempts, observe
from .probes import readable

#: Seconds between reconnection attempts at most (jittered by :data:`RECONNECT_JITTER`).
RECONNECT_MAX_DELAY = 0.5
RECONNECT_JITTER = 0.2
#: Message types an idle connection may legitimately receive: NotificationResponse,
#: NoticeResponse, ParameterStatus. Anything else (an ErrorResponse) means gone.
_IDLE_MESSAGES = frozenset(b"ANS")
_PEEK = 65536
_GONE_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT})
#: Read once: on Python 3.11 reading an enum member through its class costs about as
#: much as a function call, and every putconn() reads it.
_UNKNOWN = TransactionStatus.UNKNOWN


def server_gone(conn: psycopg.Connection[t.Any]) -> bool:
    """True when the idle *conn* certainly lost its server side. Never raises.

    One ``poll()`` when the socket has nothing to read (the common case); a
    non-consuming peek at what arrived otherwise.
    """
    if conn.closed or conn.broken:
        return True
    try:
        fd = conn.pgconn.socket
    except psycopg.OperationalError:
        return True
    try:
        if not readable(fd):
            return False
        with socket.socket(fileno=os.dup(fd)) as sock:
            data = sock.recv(_PEEK, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError as exc:
        return exc.errno in _GONE_ERRNOS
    if not data:
        return True  # EOF: the server closed the connection
    return _has_error(data)


def _has_error(data: bytes) -> bool:
    """Does this stream of backend messages say the session ended?

    An ErrorResponse does; so does a notice with an ``57P`` SQLSTATE (operator
    intervention: an immediate shutdown sends its "terminating connection"
    as a WARNING notice before it closes). NOTIFYs, other notices and
    ParameterStatus messages are what a healthy idle connection receives.
    """
    pos = 0
    while pos + 5 <= len(data):
        kind = data[pos]
        end = pos + 1 + int.from_bytes(data[pos + 1 : pos + 5], "big")
        if kind not in _IDLE_MESSAGES:
            return True
        if kind == ord("N") and _sqlstate(data[pos + 5 : end]).startswith(b"57P"):
            return True
        pos = end
    return pos < len(data) and data[pos] not in _IDLE_MESSAGES


def _sqlstate(fields: bytes) -> bytes:
    """The ``C`` field of an ErrorResponse/NoticeResponse body (b"" if not in view)."""
    for field in fields.split(b"\0"):
        if field[:1] == b"C":
            return field[1:]
    return b""


class _CappedBackoff(AttemptWithBackoff):
    """psycopg_pool's back-off with the delay capped at :data:`RECONNECT_MAX_DELAY`."""

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        cap = BasePool._jitter(RECONNECT_MAX_DELAY, -RECONNECT_JITTER, RECONNECT_JITTER)
        self.delay = min(self.delay, cap)


class RequestPool(ConnectionPool[t.Any]):
    """psycopg_pool's ``ConnectionPool`` reconnecting at most every ~0.5 s (jittered),
    quiet about the closed connections flask-reqconn gives back.

    Each missing connection has one attempt in flight at a time, so a worker
    makes at most ``max_size`` / 0.4 attempts per second during an outage.
    Each attempt is reported to :attr:`attempts`, if set, instead of psycopg_pool's
    WARNING for each failure.
    """

    #: where connection attempts are reported (set before the pool opens)
    attempts: ConnectAttempts | None = None

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        #: checked-out connections already replaced (:meth:`replace`)
        self._replaced: weakref.WeakSet[psycopg.Connection[t.Any]] = weakref.WeakSet()

    def putconn(self, conn: psycopg.Connection[t.Any]) -> None:
        """``putconn()``; a closed connection is replaced without psycopg_pool's WARNING.

        What psycopg_pool does for it (``returns_bad`` counted, a new connection
        added), minus the log line, plus one thing: the connection forgets its
        pool, so a second ``putconn()`` of it raises instead of growing the pool.
        """
        if conn.pgconn.transaction_status != _UNKNOWN:
            super().putconn(conn)
            return
        self._check_pool_putconn(conn)
        conn._pool = None
        if self._closed or conn in self._replaced:
            self._replaced.discard(conn)
            return
        self._stats[self._RETURNS_BAD] += 1
        self.run_task(AddConnection(self))

    def replace(self, conn: psycopg.Connection[t.Any]) -> None:
        """Add a connection in place of *conn* now, though *conn* is still checked out.

        For a connection whose socket was shut down while a request keeps it (see
        :meth:`~flask_reqconn.lease.Lease.sever`): when it comes back, closed,
        :meth:`putconn` does not replace it again. Safe from any thread.
        """
        if self._closed or conn in self._replaced:
            return
        self._replaced.add(conn)
        self._stats[self._RETURNS_BAD] += 1
        self.run_task(AddConnection(self))

    def _add_connection(
        self, attempt: AttemptWithBackoff | None, growing: bool = False
    ) -> None:
        if attempt is None:
            attempt = _CappedBackoff(timeout=self.reconnect_timeout)
        report = self.attempts
        if report is None:
            super()._add_connection(attempt, growing)
            return
        errors = self.get_stats().get("connections_errors", 0)
        with observe() as outcome:
            super()._add_connection(attempt, growing)
        if outcome.error is not None:
            report.failed(outcome.error)
        elif self.get_stats().get("connections_errors", 0) != errors:
            report.failed(None)  # failed, but psycopg.pool logs nothing at WARNING
        else:
            report.succeeded()
