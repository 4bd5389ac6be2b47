"""The old import path of :class:`flask_reqconn.integrations.prometheus.PrometheusMetrics`."""

from __future__ import annotations

from .integrations.prometheus import PrometheusMetrics

__all__ = ["PrometheusMetrics"]
