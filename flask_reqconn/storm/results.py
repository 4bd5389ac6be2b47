"""What a storm reports: progress events, phase results, oracle readings, the result."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .config import StormConfig


@dataclass(frozen=True)
class Progress:
    """One progress event: ``done`` of ``total`` requests of ``phase``.

    Each phase sends one event with ``done == 0`` when it starts and one with
    ``finished=True`` at its end. ``drain`` and ``settle`` (waits, no requests) have
    ``total == 0``. Phases skipped by an early stop send nothing.

    :ivar phase: ``normal``, ``abort``, ``stall`` (only with a stall style), ``drain``,
        ``health``, ``final`` or ``settle``.
    :ivar done: requests of the phase that have ended.
    :ivar total: requests planned.
    :ivar finished: the phase is over.

    .. versionadded:: 0.1
    """

    phase: str
    done: int
    total: int
    finished: bool = False


class ProgressCallback(Protocol):
    """What :func:`run_storm` calls with each :class:`Progress` event (``list.append``
    of a list will do).

    .. versionadded:: 0.1
    """

    def __call__(self, event: Progress, /) -> None: ...


@dataclass
class PhaseResult:
    """What one request phase saw.

    :ivar name: the phase: ``normal``, ``abort``, ``health`` or ``final``; ``stall`` and
        ``probes`` for the stall phase's clients and probes.
    :ivar planned: requests it was to send.
    :ivar requests: requests started.
    :ivar statuses: HTTP status -> count. In the abort phase, the statuses the ``stream``
        style saw before it dropped the response.
    :ivar errors: requests that got no status, by name (``timeout``,
        ``ERR:ConnectionRefused``, ...); never in ``statuses``.
    :ivar aborted: requests dropped as planned (abort phase).
    :ivar styles: abort style -> count (abort phase).
    :ivar skipped: requests not started because the ``max_seconds`` deadline passed.
    :ivar p50_ms: median latency in milliseconds, errors included (``None`` without
        requests); ``p99_ms`` and ``max_ms`` likewise.
    :ivar seconds: how long the phase took.

    .. versionadded:: 0.1
    """

    name: str
    planned: int
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    aborted: int = 0
    styles: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    seconds: float = 0.0

    @property
    def error_count(self) -> int:
        """Requests that ended in a socket or protocol error."""
        return sum(self.errors.values())

    @property
    def ok_count(self) -> int:
        """Requests answered with a 2xx status."""
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    @property
    def all_ok(self) -> bool:
        """Every planned request was sent and answered 2xx."""
        return self.skipped == 0 and self.ok_count == self.planned


@dataclass
class LeakReading:
    """Readings of one leak oracle: before the storm, after the drain, after the final load.

    :ivar source: ``stats`` or ``pg``.
    :ivar name: what it counts (``checked_out``, ``non-idle sessions``), as the verdict
        names it.
    :ivar label: where it reads it, for the report.
    :ivar before: the reading before any load.
    :ivar after_drain: the reading after the drain.
    :ivar at_end: the reading after the final load.
    :ivar error: the last failure to read it.

    A reading of ``None`` could not be taken (or, after an early stop, was not taken at the
    end); ``error`` says why.

    .. versionadded:: 0.1
    """

    source: str
    name: str
    label: str
    before: int | None = None
    after_drain: int | None = None
    at_end: int | None = None
    error: str | None = None

    @property
    def clean(self) -> bool:
        """Zero after the drain and at the end."""
        return self.after_drain == 0 and self.at_end == 0


@dataclass
class StallResult:
    """What the stall phase saw: clients that stay and stall, and the app meanwhile.

    :ivar clients: the stalled clients' requests (``styles``: requests per style;
        ``statuses``: answers some got before they gave up, such as 408; ``aborted``:
        requests held to the end of the stall).
    :ivar probes: GETs of the URL sent one after another during the stall; each must
        answer 2xx within ``probe_timeout``.
    :ivar seconds: how long the stalled clients stayed.
    :ivar pool_size: the pool size the checked-out count was compared with (``None``:
        unknown).
    :ivar checked_out: the stats oracle's readings during the stall, in order.
    :ivar stuck_seconds: how long ``checked_out`` sat at ``pool_size`` up to the end of
        the stall (``None`` without both).
    :ivar stuck: it sat there for at least half of the stall: connections that do not
        come back while clients stall.
    :ivar body_clients: clients that sent request bodies (``slow-body``, ``stalled-body``).
    :ivar bodies_reset: of their requests, those reset before the whole body was sent.
    :ivar answered_by_app: how many more requests the app counted as ``client_gone`` or
        ``stalled`` (499 or 408) after the stall than before (``None``: the stats have
        no such counters).
    :ivar app_saw_bodies: whether the app saw the slow bodies at all: ``False`` means a
        proxy in front buffers them; ``None``: cannot tell.
    :ivar front_end: that finding in words.

    .. versionadded:: 0.1
    """

    clients: PhaseResult
    probes: PhaseResult
    seconds: float = 0.0
    pool_size: int | None = None
    checked_out: list[int] = field(default_factory=list)
    stuck_seconds: float | None = None
    stuck: bool = False
    body_clients: int = 0
    bodies_reset: int = 0
    answered_by_app: int | None = None
    app_saw_bodies: bool | None = None
    front_end: str = ""


@dataclass
class StormResult:
    """The outcome of :func:`run_storm`. ``verdict`` starts with ``OK:`` or ``FAIL:``.

    :ivar config: the configuration it ran with.
    :ivar normal: the normal load (likewise ``abort``, ``health``, ``final``).
    :ivar leaks: one reading per leak oracle.
    :ivar drain_seconds: how long the drain waited.
    :ivar seconds: how long the whole storm took.
    :ivar deadline_hit: ``max_seconds`` ran out before every request was sent.
    :ivar ok: the verdict is OK.
    :ivar verdict: ``OK: ...`` or ``FAIL: ...`` with every reason.
    :ivar stopped_early: why the storm stopped after the health check (see
        :ref:`storm-early-stop`), else ``None``. The final load was then not sent
        (``final.requests`` is 0) and the oracles were not read at the end.
    :ivar stall: the stall phase (:ref:`storm-stall`), ``None`` without a stall style.

    .. versionadded:: 0.1
    """

    config: StormConfig
    normal: PhaseResult
    abort: PhaseResult
    health: PhaseResult
    final: PhaseResult
    leaks: list[LeakReading]
    drain_seconds: float
    seconds: float
    deadline_hit: bool
    ok: bool
    verdict: str
    stopped_early: str | None = None
    stall: StallResult | None = None

    @property
    def phases(self) -> list[PhaseResult]:
        """The request phases in the order they ran."""
        stall = [self.stall.clients, self.stall.probes] if self.stall else []
        return [self.normal, self.abort, *stall, self.health, self.final]


def percentile(ordered: Sequence[float], pct: float) -> float | None:
    """The *pct* percentile of sorted values (nearest rank), in 3 decimals."""
    if not ordered:
        return None
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return round(ordered[rank - 1], 3)
