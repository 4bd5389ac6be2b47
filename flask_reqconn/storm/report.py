"""The verdict of a storm, its report table and its JSON form."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from .config import StormConfig
from .results import LeakReading, PhaseResult, StallResult, StormResult


def _counts(counts: dict[Any, int]) -> str:
    return " ".join(f"{key}:{n}" for key, n in counts.items())


def _fmt(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def server_dead(health: PhaseResult) -> str | None:
    """Why the health check shows the server dead, or ``None`` if it got an HTTP answer.

    Dead means no status at all: refused, reset, cut off or timed out. A server that answers
    with an error status is alive, and the final load still tells how many requests fail.
    """
    if health.requests and not health.statuses and health.errors:
        return (
            f"the health check got no answer ({_counts(health.errors)}), so the server is"
            " down or hung"
        )
    return None


#: What the stall phase found out about the front end, by case.
PROXY_BUFFERS = (
    "the app never saw the slow request bodies (none of the {reset} requests reset"
    " mid-body reached it): your proxy buffers request bodies"
)
APP_HOLDS = (
    "the app holds a connection while a request body arrives: nothing in front buffers"
    " request bodies, so slow uploads take the pool"
)
APP_READS_FIRST = (
    "the app sees slow request bodies itself (it answered {answered} of the {reset}"
    " requests reset mid-body) and held no connection while they arrived"
)
NO_CONNECTION_HELD = (
    "the app held no connection while the slow bodies arrived: your proxy buffers request"
    " bodies, or the app reads them before it takes a connection (its stats have no"
    " client_gone counter to tell which)"
)
UNKNOWN = "unknown: add --stats-url to see whether slow request bodies reach the app"


def front_end_finding(
    *, body_clients: int, bodies_reset: int, answered: int | None, held: bool | None,
    stats: bool,
) -> tuple[bool | None, str]:
    """Whether the app saw the stall phase's slow bodies, and that in words.

    :param answered: how many more 499/408 the app counted after the stall (``None``: no
        such counters).
    :param held: the checked-out count rose with the body clients (``None``: no readings).
    """
    if not body_clients:
        return None, ""
    if not stats:
        return None, UNKNOWN
    if held:
        return True, APP_HOLDS
    if answered is not None and bodies_reset:
        if answered > 0:
            return True, APP_READS_FIRST.format(answered=answered, reset=bodies_reset)
        return False, PROXY_BUFFERS.format(reset=bodies_reset)
    if held is False:
        return None, NO_CONNECTION_HELD
    return None, UNKNOWN


def _stall_problems(stall: StallResult, config: StormConfig) -> list[str]:
    problems: list[str] = []
    probes = stall.probes
    clients = f"{stall.clients.planned} stalled clients ({_counts(stall.clients.styles)})"
    if probes.requests == 0:
        problems.append(f"no probe got through during the stall of {clients}")
    elif probes.ok_count < probes.requests:
        bad: dict[Any, int] = {k: v for k, v in probes.statuses.items() if not 200 <= k < 300}
        bad.update(probes.errors)
        why = ""
        if not stall.stuck and stall.pool_size is not None and stall.checked_out and (
            max(stall.checked_out) < stall.pool_size
        ):
            why = (
                "; checked_out stayed below the pool size, so the server ran out of threads"
                " or workers, not connections"
            )
        problems.append(
            f"probes during the stall {probes.ok_count}/{probes.requests} 2xx"
            f" ({_counts(bad)}, timeout {config.probe_timeout:g} s): {clients} starve the"
            f" app{why}"
        )
    if stall.stuck:
        problems.append(
            f"checked_out stuck at the pool size ({stall.pool_size}) for the last"
            f" {_fmt(stall.stuck_seconds)} s of the {stall.seconds:.1f} s stall: stalled"
            " clients hold the pool's connections"
        )
    return problems


def judge(
    config: StormConfig,
    health: PhaseResult,
    final: PhaseResult,
    readings: Sequence[LeakReading],
    deadline_hit: bool,
    stopped_early: str | None = None,
    stall: StallResult | None = None,
) -> tuple[bool, str]:
    """The verdict: ``(ok, text)``, the text starting with ``OK:`` or ``FAIL:`` and giving
    every reason for a failure; with a stall phase, what it found about the front end
    last."""
    problems: list[str] = []
    if deadline_hit:
        problems.append(f"stopped by the {config.max_seconds:g} s deadline (--max-seconds)")
    if stall is not None:
        problems.extend(_stall_problems(stall, config))
    if health.ok_count != 1:
        seen = _counts(health.statuses) or _counts(health.errors) or "not sent"
        problems.append(f"health check failed ({seen}, timeout {config.health_timeout:g} s)")
    if stopped_early is not None:
        skipped = f"the final load ({final.planned} requests)"
        if readings:
            skipped += " and the last oracle reading"
        problems.append(
            f"stopped early: {stopped_early}; {skipped} skipped (--no-early-stop runs them)"
        )
    elif not final.all_ok:
        bad: dict[Any, int] = {k: v for k, v in final.statuses.items() if not 200 <= k < 300}
        bad.update(final.errors)
        detail = f" ({_counts(bad)})" if bad else ""
        problems.append(f"final load {final.ok_count}/{final.planned} 2xx{detail}")

    def clean(reading: LeakReading) -> bool:
        return reading.after_drain == 0 and (stopped_early is not None or reading.at_end == 0)

    for reading in readings:
        if reading.after_drain != 0:
            problems.append(f"{reading.name} = {_fmt(reading.after_drain)} after the drain")
        if reading.at_end != 0 and stopped_early is None:
            problems.append(f"{reading.name} = {_fmt(reading.at_end)} after the final load")
        if reading.error and not clean(reading):
            problems.append(f"{reading.source} oracle error: {reading.error}")
    app_failed = health.ok_count != 1 or not final.all_ok
    if app_failed and readings and all(r.source == "pg" and clean(r) for r in readings):
        problems.append(
            "pg_stat_activity shows no busy session, yet the app failed: a connection the"
            " app lost is closed by the garbage collector and leaves pg_stat_activity while"
            " the pool still counts it; add --stats-url to read the pool's own count"
        )
    front_end = [f"front end: {stall.front_end}"] if stall is not None and stall.front_end else []
    if problems:
        return False, "FAIL: " + "; ".join([*problems, *front_end])
    parts = [
        f"health {next(iter(health.statuses), '?')} in {_fmt(health.p50_ms)} ms",
        f"final {final.ok_count}/{final.planned} 2xx",
    ]
    if stall is not None:
        parts.append(
            f"probes during the stall {stall.probes.ok_count}/{stall.probes.requests} 2xx"
            f" (slowest {_fmt(stall.probes.max_ms)} ms)"
        )
    if readings:
        parts.extend(f"{reading.name} 0 after drain and at end" for reading in readings)
    else:
        parts.append("no leak oracle (add --stats-url or --dsn/--application-name)")
    return True, "OK: " + "; ".join([*parts, *front_end])


def format_report(result: StormResult) -> str:
    """A compact table (phase, requests, statuses, errors, p50/p99) and the verdict last.

    .. versionadded:: 0.1
    """
    header = ("phase", "requests", "statuses", "errors", "p50 ms", "p99 ms")
    rows = [header]
    for phase in result.phases:
        statuses = _counts(phase.statuses)
        if phase.aborted:
            statuses = f"aborted:{phase.aborted} {statuses}".strip()
        requests = str(phase.requests)
        if phase.skipped:
            requests += f" (+{phase.skipped} skipped)"
        elif phase is result.final and result.stopped_early is not None:
            requests += " (stopped early)"
        rows.append((
            phase.name, requests, statuses or "-", _counts(phase.errors) or "-",
            _fmt(phase.p50_ms), _fmt(phase.p99_ms),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = {1, 4, 5}
    lines = [
        "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in rows
    ]
    if result.abort.styles:
        lines.append(f"abort styles: {_counts(result.abort.styles)}")
    stall = result.stall
    if stall is not None:
        line = (
            f"stall: {stall.clients.planned} clients for {stall.seconds:.1f} s"
            f" ({_counts(stall.clients.styles)} requests)"
        )
        if stall.checked_out:
            pool = f" of {stall.pool_size}" if stall.pool_size is not None else ""
            line += (
                f"; checked_out during it {min(stall.checked_out)}-{max(stall.checked_out)}"
                f"{pool}"
            )
            if stall.stuck_seconds:
                line += f", at the pool size for the last {stall.stuck_seconds:.1f} s"
        lines.append(line)
        if stall.front_end:
            lines.append(f"front end: {stall.front_end}")
    lines.append(f"drain: {result.drain_seconds:.1f} s; total {result.seconds:.1f} s")
    for reading in result.leaks:
        line = (
            f"leak oracle {reading.label}: before {_fmt(reading.before)}, "
            f"after drain {_fmt(reading.after_drain)}, at end {_fmt(reading.at_end)}"
        )
        if reading.error and not reading.clean:
            line += f" ({reading.error})"
        lines.append(line)
    lines.append(f"verdict: {result.verdict}")
    return "\n".join(lines)


def result_json(result: StormResult) -> dict[str, Any]:
    """:func:`dataclasses.asdict` of the result, with the DSN and header values hidden."""
    data = dataclasses.asdict(result)
    if data["config"].get("dsn"):
        data["config"]["dsn"] = "<hidden>"
    data["config"]["headers"] = [[name, "<hidden>"] for name, _ in result.config.headers]
    return data
