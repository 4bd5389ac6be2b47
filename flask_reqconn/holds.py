"""The watcher's periodic checks of one pool: ``REQCONN_MAX_HOLD`` and leak reports.

Run by the watcher thread (:mod:`flask_reqconn.watcher`); they only cancel,
shut a socket down, or log: returning a connection stays with the request's
own thread. They log on ``flask_reqconn.holds``.
"""

from __future__ import annotations

import logging
import time
import typing as t

from .lease import LeaseState, RequestLeases
from .names import CancelReason, Stat
from .watcher import SEVER_AFTER_CANCEL, WATCHER_CANCEL_TIMEOUT

if t.TYPE_CHECKING:
    from .lease import Lease
    from .pool import PoolHolder

logger = logging.getLogger(__name__)


def check_max_hold(holder: PoolHolder) -> None:
    """Take back the connections of leases held longer than ``REQCONN_MAX_HOLD``.

    First the running query is cancelled: the request's own thread then closes
    the connection at release and the pool replaces it. A lease still held
    :data:`~flask_reqconn.watcher.SEVER_AFTER_CANCEL` seconds later (or whose
    cancel cannot reach the server) has its socket shut down and its pool opens
    a replacement at once (:meth:`~flask_reqconn.lease.Lease.sever`); a stream
    whose client stopped reading is cut off.
    """
    limit = holder.max_hold
    if limit is None:
        return
    unreachable = False
    for lease in holder.counters.active_leases(releasing=True):
        if lease.state is LeaseState.RELEASING:
            _check_handback(holder, lease, limit)
            continue
        held = lease.held_for
        if held < limit or lease.severed:
            continue
        if lease.cancelled is None and not unreachable:
            if lease.cancel(CancelReason.MAX_HOLD, WATCHER_CANCEL_TIMEOUT):
                holder.counters.add(Stat.RECLAIMED)
                logger.warning(
                    "REQCONN_MAX_HOLD (%.1f s) exceeded: %s %s (endpoint %r) held its"
                    " connection %.1f s; cancelled its query, the connection will be"
                    " closed and replaced when the request lets go of it",
                    limit,
                    lease.method,
                    lease.path,
                    lease.endpoint,
                    held,
                )
                continue
            # the cancel could not reach the server (frozen, or a path that
            # drops packets): the others of this pass would wait in vain too
            unreachable = lease.cancel_uncertain
        if not (unreachable or lease.cancel_uncertain or held >= limit + SEVER_AFTER_CANCEL):
            continue  # cancelled: give the statement time to end
        # counted already if a cancel reached the server
        counted = lease.cancelled is CancelReason.MAX_HOLD and not lease.cancel_uncertain
        if lease.sever(CancelReason.MAX_HOLD):
            if not counted:
                holder.counters.add(Stat.RECLAIMED)
            cut = _cut_stream(lease)
            logger.warning(
                "REQCONN_MAX_HOLD (%.1f s) exceeded: %s %s (endpoint %r) held its"
                " connection %.1f s %s; shut the connection's socket down and opened"
                " another in its place: the request gets an error and answers 503%s",
                limit,
                lease.method,
                lease.path,
                lease.endpoint,
                held,
                "and its query could not be cancelled (the server does not answer)"
                if unreachable or lease.cancel_uncertain
                else f"(still held {SEVER_AFTER_CANCEL:.0f} s after its query was cancelled)",
                "; its stream was cut off (the client was not reading)" if cut else "",
            )


def _cut_stream(lease: Lease) -> bool:
    """End a stream whose server is stuck sending to a client that reads nothing."""
    req = lease.owner
    if isinstance(req, RequestLeases) and req.streamed and req.probe is not None:
        return req.probe.cut()
    return False


def _check_handback(holder: PoolHolder, lease: Lease, limit: float) -> None:
    """Sever a hand-back stuck on an unresponsive server past the hold limit.

    A hand-back's ``ROLLBACK`` takes milliseconds; one still running
    :data:`~flask_reqconn.watcher.WATCHER_CANCEL_TIMEOUT` seconds after it
    began, with the connection held past the limit, waits for a server that
    does not answer (frozen). No cancel: it could not reach that server.
    """
    now = time.monotonic()
    held = now - lease.checked_out_at
    if held < limit or now - lease.released_at < WATCHER_CANCEL_TIMEOUT:
        return
    if lease.sever():
        holder.counters.add(Stat.RECLAIMED)
        logger.warning(
            "REQCONN_MAX_HOLD (%.1f s) exceeded: the hand-back of %s %s (endpoint %r) has"
            " waited %.1f s for the server (held %.1f s); shut the connection's socket"
            " down: the connection is replaced",
            limit,
            lease.method,
            lease.path,
            lease.endpoint,
            now - lease.released_at,
            held,
        )


def check_leaks(holder: PoolHolder) -> None:
    """Warn once about each lease held longer than ``REQCONN_LEAK_THRESHOLD``."""
    threshold = holder.leak_threshold
    if threshold is None:
        return
    stats: dict[str, int] | None = None
    for lease in holder.counters.active_leases():
        if lease.held_for < threshold or not lease.report_leak():
            continue
        holder.counters.add(Stat.LEAK_WARNINGS)
        if stats is None:
            stats = holder.pool.get_stats() if holder.is_open else {}
        logger.warning(
            "connection held for %.1f s (threshold %.1f s) by %s %s (endpoint %r,"
            " thread %d), checked out at %s; pool %s: size=%s available=%s waiting=%s",
            lease.held_for,
            threshold,
            lease.method,
            lease.path,
            lease.endpoint,
            lease.thread_id,
            lease.checkout_site or "<unknown>",
            holder.log_name,
            stats.get("pool_size"),
            stats.get("pool_available"),
            stats.get("requests_waiting"),
        )
