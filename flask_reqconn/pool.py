"""The process-local psycopg pool behind one configured pool name.

:class:`PoolHolder` owns it: opening, the checkout (skipping idle connections whose
server is gone), the hand-back, and the pool's counters (:class:`PoolCounters`).
:class:`RequestPool` is the psycopg_pool ``ConnectionPool`` underneath.

The pool is opened lazily, in the process that serves requests, on first use:
nothing is opened at import or in ``init_app``, so a pool never crosses a
``fork()`` (gunicorn ``--preload``). If the pid changes anyway, the child opens
a fresh pool and leaves the parent's alone: it keeps a reference to it so that
garbage collection never sends a ``Terminate`` over the parent's sockets.

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

import collections
import contextlib
import logging
import os
import threading
import time
import typing as t
import weakref
from collections.abc import Callable, Iterator

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row
from psycopg_pool import ConnectionPool, PoolTimeout, TooManyRequests
from psycopg_pool.base import AttemptWithBackoff, BasePool
from psycopg_pool.pool import AddConnection

from . import holds, sizing
from .attempts import ConnectAttempts, observe
from .config import AppSettings, PoolSettings
from .connection import (
    Baseline,
    Block,
    LeasedConnection,
    Owner,
    clean_connection,
    make_read_only,
    own,
    restore_attributes,
    server_gone,
    socket_id,
)
from .exhaustion import Exhaustion, ReportLimit
from .lease import Lease, LeaseState, RequestLeases
from .names import CancelReason, ReleaseReason, Stat
from .stats import Histogram, Listener
from .watcher import get_watcher

logger = logging.getLogger("flask_reqconn.pool")

#: Pools inherited across a fork: referenced forever, never closed, never used.
_INHERITED_POOLS: list[ConnectionPool[t.Any]] = []
#: Read once: on Python 3.11 reading an enum member through its class costs about as
#: much as a function call.
_MAX_HOLD, _IDLE = CancelReason.MAX_HOLD, TransactionStatus.IDLE
#: The attribute of a pooled connection holding when it last went back to the pool.
_IDLE_SINCE = "_reqconn_idle_since"


#: Checkouts and releases recorded before they are folded into the counts (or sooner,
#: when ``stats()`` reads them).
_FOLD_EVERY = 256


class PoolCounters:
    """Thread-safe counters of one pool in one process.

    A checkout and a release take no lock: each appends its wait or hold time to a
    deque (one step, safe from any thread), and whoever reads the counters (or finds
    :data:`_FOLD_EVERY` waiting) folds them into the counts and histograms, under the
    lock. The rarer events (:meth:`add`) are counted under the lock at once.
    """

    def __init__(self, pool: str, listeners: list[Listener] | None = None) -> None:
        self.pool = pool
        self.listeners: list[Listener] = listeners if listeners is not None else []
        self._lock = threading.Lock()
        self.checkouts = 0
        self.releases: dict[ReleaseReason, int] = {reason: 0 for reason in ReleaseReason}
        self.counts: dict[Stat, int] = {stat: 0 for stat in Stat}
        self.wait_time = Histogram()
        self.hold_time = Histogram()
        #: checkouts (their wait) and releases (their reason and hold) not folded yet
        self._checkouts: collections.deque[float] = collections.deque()
        self._releases: collections.deque[tuple[ReleaseReason, float]] = collections.deque()
        #: the leases held now
        self._held: set[Lease] = set()

    def checked_out(self, lease: Lease) -> None:
        wait = lease.wait_time
        self._held.add(lease)
        checkouts = self._checkouts
        checkouts.append(wait)
        if len(checkouts) >= _FOLD_EVERY:
            self.fold()
        for listener in self.listeners:
            listener.checked_out(self.pool, wait)

    def released(self, lease: Lease, reason: ReleaseReason) -> None:
        held = lease.held_for
        self._held.discard(lease)
        releases = self._releases
        releases.append((reason, held))
        if len(releases) >= _FOLD_EVERY:
            self.fold()
        for listener in self.listeners:
            listener.released(self.pool, reason, held)

    def fold(self) -> None:
        """Count the checkouts and releases recorded so far.

        Releases first: one whose checkout is recorded meanwhile is counted with it
        next time, so ``checked_out`` is never seen below the true number.
        """
        with self._lock:
            releases, counted = self._releases, self.releases
            holds: list[float] = []
            while releases:
                reason, held = releases.popleft()
                counted[reason] += 1
                holds.append(held)
            self.hold_time.observe(holds)
            checkouts = self._checkouts
            waits: list[float] = []
            while checkouts:
                waits.append(checkouts.popleft())
            self.checkouts += len(waits)
            self.wait_time.observe(waits)

    def add(self, stat: Stat, amount: int = 1) -> None:
        """Count *amount* more of *stat*, and tell the listeners."""
        with self._lock:
            self.counts[stat] += amount
        for listener in self.listeners:
            listener.counted(self.pool, stat, amount)

    def __getitem__(self, stat: Stat) -> int:
        return self.counts[stat]

    def active_leases(self, *, releasing: bool = False) -> list[Lease]:
        """The leases of this pool held right now.

        :param releasing: also those whose connection is being handed back.
        """
        with self._lock:
            leases = list(self._held)
        return [
            lease
            for lease in leases
            if lease.active or (releasing and lease.state is LeaseState.RELEASING)
        ]

    def snapshot(self) -> dict[str, t.Any]:
        held = sorted(self.active_leases(), key=lambda lease: lease.checked_out_at)
        self.fold()
        with self._lock:
            data: dict[str, t.Any] = {
                "checked_out": self.checkouts - sum(self.releases.values()),
                "checkouts": self.checkouts,
                "releases": {reason.value: n for reason, n in self.releases.items()},
            }
            data.update((stat.value, n) for stat, n in self.counts.items())
            data["wait_time"] = self.wait_time.snapshot()
            data["hold_time"] = self.hold_time.snapshot()
        data["holders"] = [lease.describe() for lease in held]
        return data


class PoolHolder:
    """Owns the pool of one name for one app: opening, checkout, hand-back, counters."""

    def __init__(
        self,
        name: str,
        settings: PoolSettings,
        app_settings: AppSettings,
        *,
        label: str,
    ) -> None:
        self.name = name
        self.settings = settings
        #: leak detection and REQCONN_MAX_HOLD are the app's, the same for each pool
        self.leak_threshold = app_settings.leak_threshold
        self.max_hold = app_settings.max_hold
        self.watcher_tick = app_settings.watcher_tick
        self.label, self.log_name = label, f"{name!r} ({label})"  # "'default' (reqconn:app)"
        #: receive every event (shared with the counters; see add_listener)
        self.listeners: list[Listener] = []
        self.counters = PoolCounters(name, self.listeners)
        self.baseline = Baseline(
            autocommit=settings.autocommit,
            row_factory=settings.connect_args.get("row_factory", tuple_row),
        )
        self._pool: ConnectionPool[t.Any] | None = None
        self._pid = 0
        #: the process that ran the pool-sizing check (:mod:`flask_reqconn.sizing`)
        self.size_checked_in = 0
        #: worker processes of the server, if it says (:mod:`flask_reqconn.sizing`)
        self.processes: int | None = None
        #: the process that compared MAX_SIZE with the server's max_connections
        self.limits_checked_in = 0
        self._lock = threading.Lock()
        #: what a checkout that got no connection is answered: exhausted, or refused
        self.exhaustion = Exhaustion(self)
        self._lost_report = ReportLimit()

    def __repr__(self) -> str:
        return f"<PoolHolder {self.label!r} pid={self._pid or None}>"

    def add_listener(self, listener: Listener) -> None:
        """Send every later event of this pool to *listener* too."""
        self.listeners.append(listener)

    # -- the pool ---------------------------------------------------------

    @property
    def pool(self) -> ConnectionPool[t.Any]:
        """The open pool of this process, opened on first access."""
        pool = self._pool
        if pool is not None and self._pid == os.getpid():
            return pool
        return self._open()

    @property
    def is_open(self) -> bool:
        return self._pool is not None and self._pid == os.getpid()

    def _open(self) -> ConnectionPool[t.Any]:
        with self._lock:
            pid = os.getpid()
            if self._pool is not None and self._pid == pid:
                return self._pool
            if self._pool is not None:
                logger.warning(
                    "pool %s was opened in process %d before a fork; process %d opens its"
                    " own and leaves the inherited one untouched (open pools after the fork:"
                    " do not use the database at import time or in gunicorn's master)",
                    self.log_name,
                    self._pid,
                    pid,
                )
                _INHERITED_POOLS.append(self._pool)
                self.counters = PoolCounters(self.name, self.listeners)
            s = self.settings
            kwargs = dict(s.connect_args)
            pool = RequestPool(
                s.conninfo,
                kwargs=kwargs,
                min_size=s.min_size,
                max_size=s.max_size,
                timeout=s.timeout,
                max_waiting=s.max_waiting,
                max_lifetime=s.max_lifetime,
                max_idle=s.max_idle,
                name=self.label,
                connection_class=LeasedConnection,
                configure=self._configure,
                open=False,
            )
            self.exhaustion.opened(pool)
            pool.open(wait=False)
            self._pool, self._pid = pool, pid
            watcher = get_watcher()  # departed clients, REQCONN_MAX_HOLD, leak reports
            if self.watcher_tick is not None:
                watcher.watch(self, self.watcher_tick)
            else:
                watcher.start()
            logger.debug(
                "opened pool %s in process %d: %s (min_size=%d, max_size=%d)",
                self.log_name,
                pid,
                s.safe_conninfo,
                s.min_size,
                s.max_size,
            )
            return pool

    def _configure(self, conn: psycopg.Connection[t.Any]) -> None:
        if self.limits_checked_in != os.getpid():
            sizing.check_server_once(self, conn)
        socket_id(conn)  # recorded now, for REQCONN_MAX_HOLD (Lease.sever)
        if self.settings.validate_idle is not None:
            setattr(conn, _IDLE_SINCE, time.monotonic())  # noqa: B010
        if self.settings.autocommit:
            conn.autocommit = True

    def close(self) -> None:
        """Close this process's pool, if open. It reopens on next use."""
        with self._lock:
            pool, pid = self._pool, self._pid
            self._pool = None
        if pool is None:
            return
        if pid == os.getpid():
            pool.close()
        else:  # inherited across a fork: never touch the parent's sockets
            _INHERITED_POOLS.append(pool)

    # -- checkout and hand-back --------------------------------------------

    def checkout(
        self,
        owner: RequestLeases | None = None,
        *,
        site: Callable[[], str | None] | None = None,
        quiet_exhaustion: bool = False,
    ) -> Lease:
        """Wait for a connection and return it as an active :class:`Lease`.

        :param owner: the request that may use the connection, see
            :class:`~flask_reqconn.connection.LeasedConnection` (None: anyone). The
            first checkout of each process asks the server, through the request's
            environ, how many requests a worker runs at once
            (:func:`~flask_reqconn.sizing.check_concurrency`).
        :param site: called only with leak detection on, to record where the
            connection was taken.
        :param quiet_exhaustion: a fallback follows an exhaustion: do not count or log it.
        :raises PoolExhausted: when no connection came within the timeout or
            the wait queue is full.
        """
        if owner is not None and self.size_checked_in != os.getpid():
            self._check_size(owner.environ)
        lease = Lease(
            self, owner, site() if site is not None and self.leak_threshold is not None else None
        )
        try:
            lease.activate(self._getconn_alive(self.pool, lease))
        except (PoolTimeout, TooManyRequests) as exc:
            # quiet_exhaustion: a fallback follows, not an answered 503
            raise self.exhaustion.answer(exc, None if quiet_exhaustion else lease) from exc
        self.counters.checked_out(lease)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "checked out %s for %s %s after %.3f s",
                self.log_name,
                lease.method,
                lease.path,
                lease.wait_time,
            )
        return lease

    def _check_size(self, environ: t.Mapping[str, t.Any]) -> None:
        """The pool-sizing check of this process, before its pool opens (a forked
        child checks again): the server's worker processes, if it says, are what the
        check of ``max_connections`` at the first connection counts."""
        self.size_checked_in = os.getpid()
        found = sizing.check_concurrency(self, environ)
        if found is not None:
            self.processes = found.processes

    def _getconn_alive(self, pool: ConnectionPool[t.Any], lease: Lease) -> LeasedConnection:
        """``getconn()``, discarding connections whose server side is gone (no round trip).

        Bounded: at most ``max_size`` dead connections are skipped, all within
        the pool's timeout, counted from the lease's request for a connection.
        """
        conn: LeasedConnection = pool.getconn()  # the pool's timeout, REQCONN_TIMEOUT
        settings = self.settings
        for _ in range(settings.max_size):
            if not server_gone(conn) and (
                settings.validate_idle is None or self._validated(conn, lease.owner)
            ):
                return conn
            self.counters.add(Stat.DEAD_DISCARDED)
            logger.debug("discarded a connection of %s whose server side was gone", self.log_name)
            conn.close()
            pool.putconn(conn)  # closed: the pool replaces it
            waited = time.monotonic() - lease.requested_at
            conn = pool.getconn(max(0.0, settings.timeout - waited))
        return conn

    def _validated(self, conn: psycopg.Connection[t.Any], owner: Owner | None) -> bool:
        """``REQCONN_VALIDATE_IDLE``: a round trip on a connection idle that long."""
        limit = self.settings.validate_idle
        if limit is None:
            return True
        if time.monotonic() - getattr(conn, _IDLE_SINCE, 0.0) < limit:
            return True
        own(conn, owner)  # the request's, from now on
        try:
            # an empty statement (SELECT 1 before psycopg-pool 3.2.3), in autocommit
            ConnectionPool.check_connection(conn)
        except Exception as exc:
            logger.debug("validation query of a pooled connection failed: %s", exc)
            return False
        return True

    def give_back(self, lease: Lease, reason: ReleaseReason) -> None:
        """Clean the lease's connection and return it to the pool. Never raises."""
        conn = lease.conn
        try:
            if conn is None:  # never activated: nothing to give back
                return
            if lease.cancelled is _MAX_HOLD or lease.cancel_uncertain or lease.severed:
                # reclaimed (never reuse a connection a runaway request held), or
                # a cancel request that may still be on its way: it would hit the
                # next borrower's statement
                self.counters.add(Stat.DISCARDED_CONNECTIONS)
                conn.close()
                self._putconn(conn, lease)
            elif not lease.handed_out and conn.pgconn.transaction_status == _IDLE:
                # get_conn() never gave it out (an eager checkout the view did not
                # use): no statement ran, so no round trip; only the client-side
                # attributes (read-only routing) are restored
                restore_attributes(conn, self.baseline)
                self._putconn(conn, lease)
            else:
                outcome = clean_connection(
                    conn, self.baseline, reset_session=self.settings.reset_session
                )
                if outcome.discarded_writes:
                    self.counters.add(Stat.DISCARDED_WRITES)
                    logger.warning(
                        "rolled back uncommitted writes left by %s %s (endpoint %r): %s",
                        lease.method,
                        lease.path,
                        lease.endpoint,
                        "atomic mode commits only responses with status < 400 and before a"
                        " streamed body; commit explicitly otherwise"
                        if self.settings.transaction == "atomic"
                        else "the view did not commit. Call get_conn().commit() (with"
                        " SQLAlchemy, session.commit()), or set REQCONN_TRANSACTION = 'atomic'",
                    )
                if outcome.discarded:
                    self.counters.add(Stat.DISCARDED_CONNECTIONS)
                    if outcome.lost and outcome.exception is not None:
                        # an outage: one rate-limited WARNING per burst, not one per
                        # connection
                        self.log_connection_lost(
                            lease, outcome.exception, outcome="found at its hand-back, replaced"
                        )
                    elif outcome.error:
                        logger.warning(
                            "could not clean the connection of %s %s; discarding it: %s",
                            lease.method,
                            lease.path,
                            outcome.error,
                        )
                self._putconn(conn, lease)
        finally:
            self.counters.released(lease, reason)
            if lease.leak_reported:
                logger.warning(
                    "connection of %s %s (endpoint %r) reported as held too long came back"
                    " after %.1f s (released by %s)",
                    lease.method,
                    lease.path,
                    lease.endpoint,
                    lease.held_for,
                    reason.value,
                )
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "released %s of %s %s by %s after %.3f s",
                    self.log_name,
                    lease.method,
                    lease.path,
                    reason.value,
                    lease.held_for,
                )

    def replace(self, conn: psycopg.Connection[t.Any] | None) -> None:
        """Open a connection in place of *conn*, shut down while its request keeps it."""
        if conn is not None and isinstance(self._pool, RequestPool) and self.is_open:
            self._pool.replace(conn)

    def _putconn(self, conn: psycopg.Connection[t.Any], lease: Lease | None = None) -> None:
        if lease is not None and lease.seal() and not conn.closed:
            # the watcher shut the socket down while the hand-back ran (a server
            # frozen mid-ROLLBACK, REQCONN_MAX_HOLD): never reuse that connection
            self.counters.add(Stat.DISCARDED_CONNECTIONS)
            conn.close()
        if self.settings.validate_idle is not None:
            setattr(conn, _IDLE_SINCE, time.monotonic())  # noqa: B010
        pool = self._pool
        if pool is None:  # closed meanwhile
            conn.close()
            return
        try:
            pool.putconn(conn)
        except Exception as exc:  # the pool was closed meanwhile
            logger.debug("putconn to %s failed (%s); closing the connection", self.log_name, exc)
            conn.close()

    @contextlib.contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[psycopg.Connection[t.Any]]:
        """Outside requests: committed if the block succeeds, rolled back if not; reset."""
        try:
            conn = self.pool.getconn(timeout)
        except (PoolTimeout, TooManyRequests) as exc:
            raise self.exhaustion.answer(exc) from exc
        try:
            if self.settings.read_only:
                make_read_only(conn)
            with Block.holding(conn, self.name):
                yield conn
        finally:
            clean_connection(conn, self.baseline, reset_session=self.settings.reset_session)
            self._putconn(conn)

    def periodic_checks(self) -> None:
        """``REQCONN_MAX_HOLD`` and ``REQCONN_LEAK_THRESHOLD`` (:mod:`flask_reqconn.holds`)."""
        holds.check_max_hold(self)
        holds.check_leaks(self)

    def warn_finalized(self, lease: Lease) -> None:
        self.counters.add(Stat.FINALIZED)
        logger.warning(
            "connection of %s %s (endpoint %r) was never released: nothing closed the"
            " response; returned it from a finalizer after %.1f s. A server or"
            " middleware above the app does not call close() on the WSGI response.",
            lease.method,
            lease.path,
            lease.endpoint,
            lease.held_for,
        )

    # -- reporting ------------------------------------------------------------

    def log_connection_lost(
        self, lease: Lease, exc: BaseException, *, outcome: str = "answered 503"
    ) -> None:
        """One WARNING per second for connections lost mid-request; the rest counted.

        :param outcome: what the request got (a stream already started is cut off).
        """
        suppressed = self._lost_report.due()
        if suppressed is None:
            return
        logger.warning(
            "database connection of pool %s lost during %s %s: %s (%s: %s)%s",
            self.log_name,
            lease.method,
            lease.path,
            outcome,
            type(exc).__name__,
            str(exc).strip().splitlines()[0] if str(exc).strip() else "",
            f"; {suppressed} more since the last report" if suppressed else "",
        )

    def stats(self) -> dict[str, t.Any]:
        data = self.counters.snapshot()
        data["refusing"] = self.exhaustion.attempts.refusing() if self.is_open else None
        data["pool"] = self.pool.get_stats() if self.is_open else {}
        return data


#: Seconds between reconnection attempts at most (jittered by :data:`RECONNECT_JITTER`).
RECONNECT_MAX_DELAY = 0.5
RECONNECT_JITTER = 0.2
#: Read once: on Python 3.11 reading an enum member through its class costs about as
#: much as a function call, and every putconn() reads it.
_UNKNOWN = TransactionStatus.UNKNOWN


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
