"""A request that got no connection: the pool was exhausted, or the database refused.

A checkout that waited ``REQCONN_TIMEOUT`` in vain, or found ``REQCONN_MAX_WAITING``
requests already waiting, ends here, and only then: a checkout that gets its
connection never comes here. When the pool's connection attempts are being refused
(:mod:`flask_reqconn.attempts`), the request gets
:class:`~flask_reqconn.DatabaseRefused`, counted in ``refused`` and logged at DEBUG
only (the refusals have their own WARNING, once per burst); otherwise
:class:`~flask_reqconn.PoolExhausted`, counted in ``exhausted``, with at most one
WARNING a second per pool, the rest counted in it.
"""

from __future__ import annotations

import logging
import time
import typing as t

from .attempts import ConnectAttempts
from .errors import DatabaseRefused, PoolExhausted
from .names import Stat

if t.TYPE_CHECKING:
    from .lease import Lease
    from .pool import PoolHolder, RequestPool

logger = logging.getLogger(__name__)


class ReportLimit:
    """At most one WARNING a second of one kind; the ones left out are counted.

    For the pool's reports of bursts (exhaustion here, lost connections in
    :mod:`flask_reqconn.pool`): :meth:`due` says whether to log now, and how many
    were left out since the last report.
    """

    __slots__ = ("_last", "_left_out")

    def __init__(self) -> None:
        self._last = 0.0
        self._left_out = 0

    def due(self) -> int | None:
        """None: do not log (counted); else log now, naming this many left out."""
        now = time.monotonic()
        if now - self._last < 1.0:
            self._left_out += 1
            return None
        left_out, self._left_out, self._last = self._left_out, 0, now
        return left_out


class Exhaustion:
    """The answers of one pool's checkouts that got no connection.

    :param holder: the pool's holder (its name, settings, counters and open pool).
    """

    def __init__(self, holder: PoolHolder) -> None:
        self.holder = holder
        #: the connection attempts of the open pool (replaced when a pool opens)
        self.attempts = ConnectAttempts.for_pool(holder.name, holder.log_name, holder.settings)
        self._report = ReportLimit()

    def __repr__(self) -> str:
        return f"<Exhaustion {self.holder.label!r}>"

    def opened(self, pool: RequestPool) -> None:
        """*pool* was opened (first use, or after a fork): watch its attempts."""
        holder = self.holder
        self.attempts = ConnectAttempts.for_pool(holder.name, holder.log_name, holder.settings)
        pool.attempts = self.attempts

    def answer(self, exc: Exception, lease: Lease | None = None) -> PoolExhausted:
        """The 503 for a checkout that got no connection (psycopg_pool's *exc*).

        :param lease: the request's lease, counted and logged; None for a checkout
            that is not answered 503 (``reqconn.connection()``, a read fallback).
        """
        holder = self.holder
        cause = self.attempts.refusing()
        if cause is not None:
            if lease is not None:
                holder.counters.add(Stat.REFUSED)
                self.attempts.answered()
                logger.debug(
                    "database refusing connections of pool %s: %s %s answered 503 after"
                    " waiting %.3f s (%s)",
                    holder.log_name,
                    lease.method,
                    lease.path,
                    time.monotonic() - lease.requested_at,
                    cause,
                )
            return DatabaseRefused(holder.name, holder.settings.retry_after, cause)
        if lease is not None:
            holder.counters.add(Stat.EXHAUSTED)
            self._log(lease, exc)
        return PoolExhausted(holder.name, holder.settings.retry_after)

    def _log(self, lease: Lease, exc: Exception) -> None:
        suppressed = self._report.due()
        if suppressed is None:
            return
        holder = self.holder
        stats = holder.pool.get_stats() if holder.is_open else {}
        logger.warning(
            "pool %s exhausted: %s %s answered 503 after waiting %.3f s (%s);"
            " pool_size=%s available=%s waiting=%s max_size=%d%s",
            holder.log_name,
            lease.method,
            lease.path,
            time.monotonic() - lease.requested_at,
            type(exc).__name__,
            stats.get("pool_size"),
            stats.get("pool_available"),
            stats.get("requests_waiting"),
            holder.settings.max_size,
            f"; {suppressed} more since the last report" if suppressed else "",
        )
