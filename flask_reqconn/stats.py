"""The shape of :meth:`ReqConn.stats`: keys, histograms, listeners, the sums over pools.

Each pool counts its own events (:class:`flask_reqconn.pool.PoolCounters`). Everything
here is per process: under gunicorn each worker has its own
numbers (the Prometheus integration aggregates them across workers). The
counter keys are the :class:`~flask_reqconn.names.Stat` members; the keys of
one pool's entry and of the top level are :data:`POOL_KEYS` and
:data:`APP_KEYS`.
"""

from __future__ import annotations

import bisect
import os
import typing as t
from collections.abc import Iterable, Mapping

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
