"""Prometheus metrics (optional extra: ``pip install flask-reqconn[prometheus]``).

::

    from flask_reqconn.metrics import PrometheusMetrics

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

from .lease import ReleaseReason
from .stats import BUCKETS

if t.TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from .extension import AppState

_COUNTED = {
    "exhausted": ("pool_exhausted", "Requests answered 503 because the pool had no connection."),
    "client_gone": ("client_gone", "Requests answered 499 because the client had left."),
    "discarded_writes": ("discarded_writes", "Uncommitted writes rolled back at hand-back."),
    "discarded_connections": ("discarded_connections", "Connections discarded, not reused."),
    "leak_warnings": ("leak_warnings", "Leases held longer than REQCONN_LEAK_THRESHOLD."),
    "finalized": ("finalized", "Connections returned by the finalizer (nobody closed)."),
    "cancelled": ("cancelled", "Queries cancelled because their client disconnected."),
    "reclaimed": ("reclaimed", "Leases cancelled for exceeding REQCONN_MAX_HOLD."),
    "fallbacks": ("read_fallbacks", "Read-only requests sent to the default pool instead."),
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
        self.counted = {
            key: Counter(f"flask_reqconn_{name}", doc, labels, registry=reg)
            for key, (name, doc) in _COUNTED.items()
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
        from .extension import _state_of

        state = _state_of(app)
        for name, holder in state.holders.items():
            holder.listeners.append(_PoolListener(self, app.name, name, state))
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
    def __init__(self, metrics: PrometheusMetrics, app: str, pool: str, state: AppState) -> None:
        self.m = metrics
        self.labels = (app, pool)
        self.state = state
        self.pool = pool
        self._next_sample = 0.0
        self._lock = threading.Lock()

    def checked_out(self, pool: str, wait: float) -> None:
        self.m.checkouts.labels(*self.labels).inc()
        self.m.wait.labels(*self.labels).observe(wait)
        self.m.checked_out.labels(*self.labels).inc()
        self._sample()

    def released(self, pool: str, reason: ReleaseReason, held: float) -> None:
        self.m.releases.labels(*self.labels, reason.value).inc()
        self.m.hold.labels(*self.labels).observe(held)
        self.m.checked_out.labels(*self.labels).dec()
        self._sample()

    def counted(self, pool: str, name: str, amount: int) -> None:
        counter = self.m.counted.get(name)
        if counter is not None:
            counter.labels(*self.labels).inc(amount)

    def _sample(self) -> None:
        now = time.monotonic()
        if now < self._next_sample or not self._lock.acquire(blocking=False):
            return
        try:
            self._next_sample = now + _SAMPLE_EVERY
            holder = self.state.holders[self.pool]
            if holder.is_open:
                stats = holder.pool.get_stats()
                for key, gauge in self.m.pool_gauges.items():
                    gauge.labels(*self.labels).set(stats.get(key, 0))
        finally:
            self._lock.release()
