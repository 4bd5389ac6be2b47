"""Prometheus metrics (optional extra: ``pip install flask-reqconn[prometheus]``).

::

    from flask_reqconn.integrations.prometheus import PrometheusMetrics

    metrics = PrometheusMetrics()
    metrics.init_app(app)            # after reqconn.init_app(app); serves /metrics

Every pool event updates a ``prometheus_client`` metric as it happens, so
under gunicorn with several workers the numbers add up across processes when
``prometheus_client``'s multiprocess mode is on: set
``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before gunicorn starts and
call ``prometheus_client.multiprocess.mark_process_dead(worker.pid)`` from
gunicorn's ``child_exit`` hook. The ``/metrics`` view then aggregates the
files of all workers, whichever worker answers.

Metric names (all labelled ``app`` and ``pool``):

- ``flask_reqconn_checkouts_total``
- ``flask_reqconn_releases_total`` (label ``reason``: teardown, close, abort, ...)
- ``flask_reqconn_pool_exhausted_total`` (503s), ``flask_reqconn_client_gone_total`` (499s)
- ``flask_reqconn_database_refused_total`` (503s while the database refused connections)
- ``flask_reqconn_discarded_writes_total``, ``flask_reqconn_discarded_connections_total``
- ``flask_reqconn_leak_warnings_total``, ``flask_reqconn_finalized_total``
- ``flask_reqconn_cancelled_total``, ``flask_reqconn_reclaimed_total``,
  ``flask_reqconn_read_fallbacks_total``
- ``flask_reqconn_checkout_wait_seconds`` and ``flask_reqconn_hold_seconds`` (histograms)
- ``flask_reqconn_checked_out`` (gauge: leases held now, summed over live workers)
- ``flask_reqconn_pool_size``, ``flask_reqconn_pool_available``,
  ``flask_reqconn_pool_waiting``, ``flask_reqconn_pool_max_size`` (gauges, sampled at
  most twice a second per worker on checkout and release)
"""

from __future__ import annotations

import os
import threading
import time
import typing as t

from flask import Blueprint, Flask, Response

from ..names import ReleaseReason, Stat
from ..state import state_of
from ..stats import BUCKETS

if t.TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from ..pool import PoolHolder

#: The counter of each :class:`~flask_reqconn.names.Stat`: its name (without
#: ``flask_reqconn_`` and ``_total``) and its help text.
COUNTERS: dict[Stat, tuple[str, str]] = {
    Stat.EXHAUSTED: ("pool_exhausted", "Requests answered 503 because the pool had no connection."),
    Stat.REFUSED: (
        "database_refused",
        "Requests answered 503 because the database refused connections or was unreachable.",
    ),
    Stat.CLIENT_GONE: ("client_gone", "Requests answered 499 because the client had left."),
    Stat.STALLED: ("stalled", "Requests answered 408: the client stalled sending its body."),
    Stat.DISCARDED_WRITES: ("discarded_writes", "Uncommitted writes rolled back at hand-back."),
    Stat.DISCARDED_CONNECTIONS: ("discarded_connections", "Connections discarded, not reused."),
    Stat.LEAK_WARNINGS: ("leak_warnings", "Leases held longer than REQCONN_LEAK_THRESHOLD."),
    Stat.FINALIZED: ("finalized", "Connections returned by the finalizer (nobody closed)."),
    Stat.CANCELLED: ("cancelled", "Queries cancelled because their client disconnected."),
    Stat.RECLAIMED: ("reclaimed", "Leases cancelled for exceeding REQCONN_MAX_HOLD."),
    Stat.FALLBACKS: ("read_fallbacks", "Read-only requests sent to the default pool instead."),
    Stat.DEAD_DISCARDED: ("dead_discarded", "Dead pooled connections discarded at checkout."),
    Stat.CONNECTION_LOST: ("connection_lost", "Requests answered 503: connection lost mid-way."),
}
_SAMPLE_EVERY = 0.5


class PrometheusMetrics:
    """Feed flask-reqconn's pool events into ``prometheus_client`` metrics.

    :param registry: where to register the metrics (default: the global
        ``prometheus_client.REGISTRY``).
    :param path: the URL of the exposition view added by :meth:`init_app`;
        ``None`` adds no view.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, path: str | None = "/metrics"
    ) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else REGISTRY
        self.path = path
        labels = ["app", "pool"]
        reg = self.registry
        self.checkouts = Counter(
            "flask_reqconn_checkouts", "Connections checked out for requests.", labels,
            registry=reg,
        )  # fmt: skip
        self.releases = Counter(
            "flask_reqconn_releases", "Connections given back, by who released them.",
            [*labels, "reason"], registry=reg,
        )  # fmt: skip
        self.counted: dict[Stat, t.Any] = {
            key: Counter(f"flask_reqconn_{name}", doc, labels, registry=reg)
            for key, (name, doc) in COUNTERS.items()
        }
        self.wait = Histogram(
            "flask_reqconn_checkout_wait_seconds", "Time spent waiting for a pool connection.",
            labels, buckets=BUCKETS, registry=reg,
        )  # fmt: skip
        self.hold = Histogram(
            "flask_reqconn_hold_seconds", "Time a request held its connection.",
            labels, buckets=BUCKETS, registry=reg,
        )  # fmt: skip
        self.checked_out = Gauge(
            "flask_reqconn_checked_out", "Connections checked out right now.", labels,
            registry=reg, multiprocess_mode="livesum",
        )  # fmt: skip
        self.pool_gauges = {
            key: Gauge(
                f"flask_reqconn_pool_{name}", doc, labels, registry=reg,
                multiprocess_mode="livesum",
            )  # fmt: skip
            for key, name, doc in (
                ("pool_size", "size", "Connections the pool has open."),
                ("pool_available", "available", "Idle connections in the pool."),
                ("requests_waiting", "waiting", "Requests waiting for a connection."),
                ("pool_max", "max_size", "The pool's max_size."),
            )
        }

    def init_app(self, app: Flask) -> None:
        """Start feeding the metrics of *app* (call after ``ReqConn.init_app``)."""
        state = state_of(app)
        for name, holder in state.pools.items():
            state.add_listener(_PoolListener(self, app.name, holder), pool=name)
        if self.path is not None:
            bp = Blueprint(f"reqconn_metrics_{id(self):x}", __name__)
            state.ext.exempt(bp)
            bp.add_url_rule(self.path, "metrics", self.exposition)
            app.register_blueprint(bp)

    def exposition(self) -> Response:
        """The metrics in the Prometheus text format (all workers in multiprocess mode)."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            data = generate_latest(registry)
        else:
            data = generate_latest(self.registry)
        return Response(data, mimetype=CONTENT_TYPE_LATEST)


class _PoolListener:
    """Feeds one pool's events into the metrics (a :class:`~flask_reqconn.stats.Listener`).

    Each metric's child for the pool's labels is made once, here, as
    ``prometheus_client`` advises: ``labels()`` checks and looks its labels up under a
    lock on every call, which would cost each event more than the update itself. Every
    series of the pool is thereby exported from the start, at 0, so a rate sees the
    first event too.
    """

    def __init__(self, metrics: PrometheusMetrics, app: str, holder: PoolHolder) -> None:
        labels = (app, holder.name)
        self.holder = holder
        self._checkouts = metrics.checkouts.labels(*labels)
        self._releases = {
            reason: metrics.releases.labels(*labels, reason.value) for reason in ReleaseReason
        }
        self._counted = {stat: counter.labels(*labels) for stat, counter in metrics.counted.items()}
        self._wait = metrics.wait.labels(*labels)
        self._hold = metrics.hold.labels(*labels)
        self._checked_out = metrics.checked_out.labels(*labels)
        self._pool_gauges = [
            (key, gauge.labels(*labels)) for key, gauge in metrics.pool_gauges.items()
        ]
        self._next_sample = 0.0
        self._lock = threading.Lock()

    def checked_out(self, pool: str, wait: float) -> None:
        self._checkouts.inc()
        self._wait.observe(wait)
        self._checked_out.inc()
        self._sample()

    def released(self, pool: str, reason: ReleaseReason, held: float) -> None:
        self._releases[reason].inc()
        self._hold.observe(held)
        self._checked_out.dec()
        self._sample()

    def counted(self, pool: str, name: Stat, amount: int) -> None:
        counter = self._counted.get(name)
        if counter is not None:
            counter.inc(amount)

    def _sample(self) -> None:
        now = time.monotonic()
        if now < self._next_sample or not self._lock.acquire(blocking=False):
            return
        try:
            self._next_sample = now + _SAMPLE_EVERY
            holder = self.holder
            if holder.is_open:
                stats = holder.pool.get_stats()
                for key, gauge in self._pool_gauges:
                    gauge.set(stats.get(key, 0))
        finally:
            self._lock.release()
