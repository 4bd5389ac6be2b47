"""Counters kept per pool, and the shape of :meth:`ReqConn.stats`.

Everything here is per process: under gunicorn each worker has its own
numbers (the Prometheus integration aggregates them across workers). The
counter keys are the :class:`~flask_reqconn.names.Stat` members; the keys of
one pool's entry and of the top level are :data:`POOL_KEYS` and
:data:`APP_KEYS`.
"""

from __future__ import annotations

import bisect
import collections
import os
import threading
import typing as t
from collections.abc import Iterable, Mapping

from .lease import Lease, LeaseState
from .names import ReleaseReason, Stat

#: Upper bounds (seconds) of the wait and hold time histograms; the last
#: bucket (``+Inf``) is implied.
BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0)

#: The keys of one pool's entry in ``stats()["pools"]``, in order.
POOL_KEYS: tuple[str, ...] = (
    "checked_out",
    "checkouts",
    "releases",
    *(stat.value for stat in Stat),
    "wait_time",
    "hold_time",
    "holders",
    "refusing",
    "pool",
)
#: The keys of the top level of :meth:`~flask_reqconn.ReqConn.stats`, in order: the sums
#: over the app's pools, and the pools themselves.
APP_KEYS: tuple[str, ...] = (
    "pid",
    "checked_out",
    "checkouts",
    "releases",
    *(stat.value for stat in Stat),
    "pools",
)


class Listener(t.Protocol):
    """Receives every event of a pool; add one with
    :meth:`~flask_reqconn.state.AppState.add_listener`.

    Called in the thread of the event (a request's, or the watcher's): keep it
    quick and never raise.
    """

    def checked_out(self, pool: str, wait: float) -> None:
        """A request got a connection of *pool* after *wait* seconds."""

    def released(self, pool: str, reason: ReleaseReason, held: float) -> None:
        """A connection of *pool* came back, after being held *held* seconds."""

    def counted(self, pool: str, name: Stat, amount: int) -> None:
        """The counter *name* of *pool* grew by *amount*."""


class Histogram:
    """A fixed-bucket histogram: ``count``, ``sum`` and cumulative ``buckets``."""

    __slots__ = ("count", "total", "_counts")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self._counts = [0] * (len(BUCKETS) + 1)

    def observe(self, values: list[float]) -> None:
        """Count *values* in (and empty the list)."""
        counts = self._counts
        for value in values:
            counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.count += len(values)
        self.total += sum(values)
        values.clear()

    def snapshot(self) -> dict[str, t.Any]:
        cumulative: dict[str, int] = {}
        running = 0
        for bound, n in zip((*map(str, BUCKETS), "+Inf"), self._counts, strict=True):
            running += n
            cumulative[bound] = running
        return {"count": self.count, "sum": round(self.total, 6), "buckets": cumulative}


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
        #: the leases held now, by id
        self._held: dict[int, Lease] = {}

    def checked_out(self, lease: Lease) -> None:
        wait = lease.wait_time
        self._held[id(lease)] = lease
        checkouts = self._checkouts
        checkouts.append(wait)
        if len(checkouts) >= _FOLD_EVERY:
            self.fold()
        for listener in self.listeners:
            listener.checked_out(self.pool, wait)

    def released(self, lease: Lease, reason: ReleaseReason) -> None:
        held = lease.held_for
        self._held.pop(id(lease), None)
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
            leases = list(self._held.values())
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


def sum_pools(pools: Mapping[str, Mapping[str, t.Any]]) -> dict[str, t.Any]:
    """The top level of :meth:`ReqConn.stats`: every counter summed over *pools*.

    :param pools: each pool's snapshot (with its ``pool`` entry), by name.
    """
    snapshots: Iterable[Mapping[str, t.Any]] = pools.values()
    releases = {reason.value: 0 for reason in ReleaseReason}
    for data in snapshots:
        for reason, n in data["releases"].items():
            releases[reason] += n
    result: dict[str, t.Any] = {
        "pid": os.getpid(),
        "checked_out": sum(p["checked_out"] for p in snapshots),
        "checkouts": sum(p["checkouts"] for p in snapshots),
        "releases": releases,
    }
    for stat in Stat:
        result[stat.value] = sum(p[stat.value] for p in snapshots)
    result["pools"] = dict(pools)
    return result
