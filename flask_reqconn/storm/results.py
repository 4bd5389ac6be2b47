"""What a storm reports: progress events, phase results, oracle readings, the result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .config import StormConfig


@dataclass(frozen=True)
class Progress:
    """One progress event: ``done`` of ``total`` requests of ``phase``.

    Each phase sends one event with ``done == 0`` when it starts and one with
    ``finished=True`` at its end. ``drain`` and ``settle`` (waits, no requests) have
    ``total == 0``. Phases skipped by an early stop send nothing.

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

    ``requests`` counts requests started; ``skipped`` those not started because the
    ``max_seconds`` deadline passed. Socket-level failures are in ``errors`` (``timeout``,
    ``ERR:ConnectionRefused``, ...), never in ``statuses``.

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

    ``None`` means it could not be read (or, after an early stop, was not read at the end);
    ``error`` says why (last failure).

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
class StormResult:
    """The outcome of :func:`run_storm`. ``verdict`` starts with ``OK:`` or ``FAIL:``.

    ``stopped_early`` says why the storm stopped after the health check (see
    :attr:`StormConfig.early_stop`); the final load was then not sent (``final.requests``
    is 0) and the oracles were not read at the end.

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

    @property
    def phases(self) -> list[PhaseResult]:
        """The request phases in the order they ran."""
        return [self.normal, self.abort, self.health, self.final]
