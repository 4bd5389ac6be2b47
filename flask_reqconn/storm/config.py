"""The storm's options (:class:`StormConfig`), its limits, and :class:`StormError`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: Abort styles: ``close`` (send the request, close at once), ``delay`` (close after
#: ``abort_delay``), ``rst`` (close with ``SO_LINGER`` 0, so the peer gets a TCP reset) and
#: ``stream`` (GET ``stream_path``, read the first body bytes, drop the connection).
ABORT_STYLES = ("close", "delay", "rst", "stream")

#: Hard cap on the requests of one phase.
MAX_REQUESTS_PER_PHASE = 100_000
#: Hard cap on the client threads of one phase.
MAX_CONCURRENCY = 512
#: Hard cap on ``max_seconds``.
MAX_SECONDS = 3600.0


class StormError(ValueError):
    """The storm cannot run as configured: a bad or remote target, an unreadable oracle.

    Raised by :func:`run_storm` before any load is sent; ``main()`` exits with status 2.

    .. versionadded:: 0.1
    """


@dataclass(frozen=True)
class StormConfig:
    """Every knob of a storm. Paths (``health_path``, ``stream_path``, ``stats_url``) may be
    absolute URLs or paths resolved against ``url``.

    :raises ValueError: on out-of-range values or inconsistent options.

    .. versionadded:: 0.1
    """

    url: str
    normal_count: int = 200
    normal_concurrency: int = 16
    normal_timeout: float = 10.0
    abort_count: int = 500
    abort_concurrency: int = 32
    #: Styles to mix, round-robin; empty means ``close``, ``delay``, ``rst`` and, if
    #: ``stream_path`` is set, ``stream``.
    abort_styles: tuple[str, ...] = ()
    abort_delay: float = 0.001
    abort_timeout: float = 5.0
    stream_path: str | None = None
    drain_pause: float = 1.0
    drain_timeout: float = 10.0
    health_path: str | None = None
    health_timeout: float = 5.0
    final_count: int = 100
    final_concurrency: int = 16
    final_timeout: float = 10.0
    stats_url: str | None = None
    stats_key: str = "checked_out"
    dsn: str | None = field(default=None, repr=False)
    application_name: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    max_seconds: float = 300.0
    allow_remote: bool = False
    #: When the health check gets no answer at all (refused, reset, timed out), skip the
    #: final load and the last oracle reading and give the verdict at once. ``False``
    #: runs every phase anyway (``--no-early-stop``).
    early_stop: bool = True

    def __post_init__(self) -> None:
        for name in ("normal_count", "abort_count", "final_count"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_REQUESTS_PER_PHASE:
                raise ValueError(f"{name} must be 0..{MAX_REQUESTS_PER_PHASE}, got {value}")
        for name in ("normal_concurrency", "abort_concurrency", "final_concurrency"):
            value = getattr(self, name)
            if not 1 <= value <= MAX_CONCURRENCY:
                raise ValueError(f"{name} must be 1..{MAX_CONCURRENCY}, got {value}")
        for name in (
            "normal_timeout", "abort_timeout", "health_timeout", "final_timeout",
            "drain_timeout", "max_seconds",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        for name in ("abort_delay", "drain_pause"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be >= 0 seconds, got {value}")
        if self.max_seconds > MAX_SECONDS:
            raise ValueError(f"max_seconds is capped at {MAX_SECONDS:g}, got {self.max_seconds}")
        for style in self.abort_styles:
            if style not in ABORT_STYLES:
                raise ValueError(
                    f"unknown abort style {style!r}; choose from {', '.join(ABORT_STYLES)}"
                )
        if "stream" in self.abort_styles and not self.stream_path:
            raise ValueError("abort style 'stream' needs stream_path (--stream-path)")
        if (self.dsn is None) != (self.application_name is None):
            raise ValueError(
                "the pg_stat_activity oracle needs both dsn (--dsn) and "
                "application_name (--application-name)"
            )
        if not self.stats_key or any(not part for part in self.stats_key.split(".")):
            raise ValueError(f"stats_key must be a dotted key path, got {self.stats_key!r}")
        for name, value in self.headers:
            if not name or any(c in name + value for c in "\r\n") or ":" in name:
                raise ValueError(f"invalid header {name!r}: {value!r}")

    @property
    def effective_abort_styles(self) -> tuple[str, ...]:
        """The styles the abort phase cycles through."""
        if self.abort_styles:
            return self.abort_styles
        base = ("close", "delay", "rst")
        return (*base, "stream") if self.stream_path else base
