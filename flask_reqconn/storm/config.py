"""The storm's options (:class:`StormConfig`), its limits, and :class:`StormError`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: Abort styles. Clients that leave, in the abort phase: ``close`` (send the request, close
#: at once), ``delay`` (close after ``abort_delay``), ``rst`` (close with ``SO_LINGER`` 0, so
#: the peer gets a TCP reset), ``stream`` (GET ``stream_path``, read the first body bytes,
#: drop the connection) and ``body-reset`` (POST ``body_path``: the head and half the body,
#: then a reset). Clients that stay and stall, in the stall phase (:data:`STALL_STYLES`):
#: ``slow-body``, ``stalled-body`` and ``stop-reading``.
ABORT_STYLES = (
    "close", "delay", "rst", "stream", "body-reset", "slow-body", "stalled-body", "stop-reading",
)  # fmt: skip
#: The styles of the stall phase: ``slow-body`` (POST ``body_path`` with a
#: ``Content-Length`` of ``body_size``, then one byte every ``body_interval``),
#: ``stalled-body`` (the head and a few bytes, then nothing) and ``stop-reading`` (GET
#: ``stream_path``, read the first chunk, then keep the connection open without reading).
#: Each stays for ``stall_seconds`` while probes check that the app still answers.
STALL_STYLES = ("slow-body", "stalled-body", "stop-reading")
#: The styles that send a request body (to ``body_path``).
BODY_STYLES = ("body-reset", "slow-body", "stalled-body")

#: Hard cap on the requests of one phase.
MAX_REQUESTS_PER_PHASE = 100_000
#: Hard cap on the client threads of one phase.
MAX_CONCURRENCY = 512
#: Hard cap on ``max_seconds``.
MAX_SECONDS = 3600.0
#: Hard cap on ``body_size``.
MAX_BODY_SIZE = 64 * 1024 * 1024


class StormError(ValueError):
    """The storm cannot run as configured: a bad or remote target, an unreadable oracle.

    Raised by :func:`run_storm` before any load is sent; ``main()`` exits with status 2.

    .. versionadded:: 0.1
    """


@dataclass(frozen=True)
class StormConfig:
    """Every knob of a storm. Paths (``health_path``, ``stream_path``, ``stats_url``) may be
    absolute URLs or paths resolved against ``url``. Times are in seconds.

    :param url: the ``http://`` URL of the app: the target of the normal and final load.
    :param normal_count: requests of the normal load.
    :param normal_concurrency: its client threads.
    :param normal_timeout: time per request.
    :param abort_count: requests that the client drops.
    :param abort_concurrency: their client threads.
    :param abort_styles: styles to mix, round-robin (:data:`ABORT_STYLES`); empty means
        ``close``, ``delay``, ``rst`` and, if ``stream_path`` is set, ``stream``. The
        :data:`STALL_STYLES` among them run in a phase of their own, after the aborts.
    :param abort_delay: how long the ``delay`` style waits before it closes.
    :param abort_timeout: time per aborted request (connect, send, first chunk).
    :param stream_path: a streamed response, for the ``stream`` and ``stop-reading`` styles;
        for ``stop-reading`` it must be longer than the socket buffers (several MB).
    :param body_path: where the body styles POST (default: ``url``).
    :param body_size: the ``Content-Length`` the body styles announce.
    :param body_interval: the pause between the bytes of ``slow-body``.
    :param stall_count: clients of the stall phase, all at once, round-robin over the
        stall styles chosen.
    :param stall_seconds: how long they stay; probes run meanwhile.
    :param probe_interval: the pause between two probes (GETs of ``url``) during the stall.
    :param probe_timeout: time per probe; keep it above the app's pool timeout, so that the
        app's own answer (a 503) is seen rather than a client timeout.
    :param pool_size: the app's pool size, to tell whether ``checked_out`` is stuck at it
        during the stall (default: ``pool_max`` from the stats JSON, when it has one).
    :param drain_pause: the wait after the aborts, without a leak oracle.
    :param drain_timeout: the longest wait for the oracles to read 0 twice in a row, after
        the aborts and again after the final load.
    :param health_path: the health check (default: ``url``).
    :param health_timeout: the time the health check, and each oracle reading, may take.
    :param final_count: requests of the final load, which must all answer 2xx.
    :param final_concurrency: its client threads.
    :param final_timeout: time per request.
    :param stats_url: the JSON endpoint of the ``stats`` oracle.
    :param stats_key: the dotted key of the checked-out count in it.
    :param dsn: the conninfo of the ``pg`` oracle (left out of ``repr`` and hidden in JSON).
    :param application_name: the app's ``application_name``, for the ``pg`` oracle.
    :param headers: extra ``(name, value)`` headers on every request.
    :param max_seconds: the deadline of the whole storm (at most :data:`MAX_SECONDS`).
    :param allow_remote: allow targets that do not resolve to loopback.
    :param early_stop: when the health check gets no answer at all (the server is dead or
        hung), skip the final load and the last oracle reading and give the verdict at once;
        ``False`` runs every phase anyway.
    :raises ValueError: on out-of-range values or inconsistent options.

    .. versionadded:: 0.1
    """

    url: str
    normal_count: int = 200
    normal_concurrency: int = 16
    normal_timeout: float = 10.0
    abort_count: int = 500
    abort_concurrency: int = 32
    abort_styles: tuple[str, ...] = ()
    abort_delay: float = 0.001
    abort_timeout: float = 5.0
    stream_path: str | None = None
    body_path: str | None = None
    body_size: int = 1000
    body_interval: float = 0.5
    stall_count: int = 6
    stall_seconds: float = 10.0
    probe_interval: float = 0.2
    probe_timeout: float = 10.0
    pool_size: int | None = None
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
    early_stop: bool = True

    def __post_init__(self) -> None:
        for name in ("normal_count", "abort_count", "final_count"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_REQUESTS_PER_PHASE:
                raise ValueError(f"{name} must be 0..{MAX_REQUESTS_PER_PHASE}, got {value}")
        for name in ("normal_concurrency", "abort_concurrency", "final_concurrency",
                     "stall_count"):
            value = getattr(self, name)
            if not 1 <= value <= MAX_CONCURRENCY:
                raise ValueError(f"{name} must be 1..{MAX_CONCURRENCY}, got {value}")
        for name in (
            "normal_timeout", "abort_timeout", "health_timeout", "final_timeout",
            "drain_timeout", "max_seconds", "body_interval", "stall_seconds",
            "probe_interval", "probe_timeout",
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
        for style in ("stream", "stop-reading"):
            if style in self.abort_styles and not self.stream_path:
                raise ValueError(f"abort style {style!r} needs stream_path (--stream-path)")
        if not 2 <= self.body_size <= MAX_BODY_SIZE:
            raise ValueError(f"body_size must be 2..{MAX_BODY_SIZE} bytes, got {self.body_size}")
        if self.pool_size is not None and self.pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, got {self.pool_size}")
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
        """The styles chosen: ``abort_styles``, or by default ``close``, ``delay``, ``rst``
        and, with ``stream_path``, ``stream`` (the body and stall styles only when named)."""
        if self.abort_styles:
            return self.abort_styles
        base = ("close", "delay", "rst")
        return (*base, "stream") if self.stream_path else base

    @property
    def quick_styles(self) -> tuple[str, ...]:
        """The styles of the abort phase (clients that leave)."""
        return tuple(s for s in self.effective_abort_styles if s not in STALL_STYLES)

    @property
    def stall_styles(self) -> tuple[str, ...]:
        """The styles of the stall phase (clients that stay); empty: no stall phase."""
        return tuple(s for s in self.effective_abort_styles if s in STALL_STYLES)
