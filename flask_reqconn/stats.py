"""Counters kept per pool and per app, and the shape of :meth:`ReqConn.stats`."""

from __future__ import annotations

import threading
import typing as t
import weakref

from .lease import Lease, ReleaseReason


class PoolCounters:
    """Thread-safe counters of one pool in one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.checkouts = 0
        self.releases: dict[ReleaseReason, int] = {reason: 0 for reason in ReleaseReason}
        self.exhausted = 0
        self.discarded_writes = 0
        self.discarded_connections = 0
        self.finalized = 0
        self._holders: weakref.WeakSet[Lease] = weakref.WeakSet()

    def checked_out(self, lease: Lease) -> None:
        with self._lock:
            self.checkouts += 1
            self._holders.add(lease)

    def released(self, lease: Lease, reason: ReleaseReason) -> None:
        with self._lock:
            self.releases[reason] += 1
            self._holders.discard(lease)

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)

    def snapshot(self) -> dict[str, t.Any]:
        with self._lock:
            releases = {reason.value: n for reason, n in self.releases.items()}
            holders = [
                {
                    "endpoint": lease.endpoint,
                    "method": lease.method,
                    "path": lease.path,
                    "held_for": round(lease.held_for, 6),
                }
                for lease in list(self._holders)
                if lease.active
            ]
            return {
                "checked_out": self.checkouts - sum(self.releases.values()),
                "checkouts": self.checkouts,
                "releases": releases,
                "exhausted": self.exhausted,
                "discarded_writes": self.discarded_writes,
                "discarded_connections": self.discarded_connections,
                "finalized": self.finalized,
                "holders": holders,
            }
