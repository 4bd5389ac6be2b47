"""Counters kept per pool, and the shape of :meth:`ReqConn.stats`.

Everything here is per process: under gunicorn each worker has its own
numbers (the Prometheus integration aggregates them across workers).
"""

from __future__ import annotations

import bisect
import threading
import typing as t
import weakref

from .lease import Lease, ReleaseReason

#: Upper bounds (seconds) of the wait and hold time histograms; the last
#: bucket (``+Inf``) is implied.
BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0)


class Listener(t.Protocol):
    """Receives every event of a pool (used by the Prometheus integration)."""

    def checked_out(self, pool: str, wait: float) -> None: ...

    def released(self, pool: str, reason: ReleaseReason, held: float) -> None: ...

    def counted(self, pool: str, name: str, amount: int) -> None: ...


class Histogram:
    """A fixed-bucket histogram: ``count``, ``sum`` and cumulative ``buckets``."""

    __slots__ = ("count", "total", "_counts")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self._counts = [0] * (len(BUCKETS) + 1)

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        self._counts[bisect.bisect_left(BUCKETS, value)] += 1

    def snapshot(self) -> dict[str, t.Any]:
        cumulative: dict[str, int] = {}
        running = 0
        for bound, n in zip((*map(str, BUCKETS), "+Inf"), self._counts, strict=True):
            running += n
            cumulative[bound] = running
        return {"count": self.count, "sum": round(self.total, 6), "buckets": cumulative}


class PoolCounters:
    """Thread-safe counters of one pool in one process."""

    def __init__(self, pool: str = "default", listeners: list[Listener] | None = None) -> None:
        self.pool = pool
        self.listeners: list[Listener] = listeners if listeners is not None else []
        self._lock = threading.Lock()
        self.checkouts = 0
        self.releases: dict[ReleaseReason, int] = {reason: 0 for reason in ReleaseReason}
        self.exhausted = 0
        self.discarded_writes = 0
        self.discarded_connections = 0
        self.finalized = 0
        self.leak_warnings = 0
        self.client_gone = 0
        self.cancelled = 0
        self.reclaimed = 0
        self.fallbacks = 0
        self.wait_time = Histogram()
        self.hold_time = Histogram()
        # weak: an abandoned lease must stay collectable (its finalizer returns it)
        self._holders: dict[int, weakref.ref[Lease]] = {}

    def checked_out(self, lease: Lease) -> None:
        wait = lease.wait_time
        with self._lock:
            self.checkouts += 1
            self.wait_time.observe(wait)
            self._holders[id(lease)] = weakref.ref(lease)
        for listener in self.listeners:
            listener.checked_out(self.pool, wait)

    def released(self, lease: Lease, reason: ReleaseReason) -> None:
        held = lease.held_for
        with self._lock:
            self.releases[reason] += 1
            self.hold_time.observe(held)
            self._holders.pop(id(lease), None)
        for listener in self.listeners:
            listener.released(self.pool, reason, held)

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)
        for listener in self.listeners:
            listener.counted(self.pool, name, amount)

    def active_leases(self) -> list[Lease]:
        with self._lock:
            refs = list(self._holders.values())
        return [lease for ref in refs if (lease := ref()) is not None and lease.active]

    def snapshot(self) -> dict[str, t.Any]:
        holders = sorted(self.active_leases(), key=lambda lease: lease.checked_out_at)
        with self._lock:
            releases = {reason.value: n for reason, n in self.releases.items()}
            return {
                "checked_out": self.checkouts - sum(self.releases.values()),
                "checkouts": self.checkouts,
                "releases": releases,
                "exhausted": self.exhausted,
                "discarded_writes": self.discarded_writes,
                "discarded_connections": self.discarded_connections,
                "finalized": self.finalized,
                "leak_warnings": self.leak_warnings,
                "client_gone": self.client_gone,
                "cancelled": self.cancelled,
                "reclaimed": self.reclaimed,
                "fallbacks": self.fallbacks,
                "wait_time": self.wait_time.snapshot(),
                "hold_time": self.hold_time.snapshot(),
                "holders": [lease.describe() for lease in holders],
            }
