"""The storm's phases: a bounded, threaded runner for one phase, and all of them in order
(the stall phase is :mod:`.stall`)."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from urllib.parse import urljoin

from .client import (
    Outcome,
    Target,
    aborted_request,
    post_head_bytes,
    request_bytes,
    resolve,
    timed_get,
)
from .config import StormConfig, StormError
from .oracles import Oracle, PgOracle, StatsOracle, read_oracles, settle
from .report import judge, server_dead
from .results import (
    LeakReading,
    PhaseResult,
    Progress,
    ProgressCallback,
    StallResult,
    StormResult,
    percentile,
)
from .stall import run_stall

logger = logging.getLogger(__name__)


def run_phase(
    name: str,
    planned: int,
    concurrency: int,
    job: Callable[[int, float], Outcome],
    deadline: float,
    progress: ProgressCallback | None,
) -> PhaseResult:
    """Run ``job(index, deadline)`` ``planned`` times on ``concurrency`` threads."""
    result = PhaseResult(name=name, planned=planned)
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    styles: Counter[str] = Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()
    failures: list[BaseException] = []
    started = 0
    done = 0

    def emit(event: Progress) -> None:
        if progress is not None:
            progress(event)

    def worker() -> None:
        nonlocal started, done
        try:
            while not stop.is_set():
                with lock:
                    if started >= planned or time.monotonic() >= deadline:
                        return
                    index = started
                    started += 1
                outcome = job(index, deadline)
                with lock:
                    done += 1
                    latencies.append(outcome.latency_ms)
                    if outcome.status is not None:
                        statuses[outcome.status] += 1
                    if outcome.error is not None:
                        errors[outcome.error] += 1
                    if outcome.aborted:
                        result.aborted += 1
                    if outcome.style is not None:
                        styles[outcome.style] += 1
                    emit(Progress(name, done, planned))
        except BaseException as exc:  # re-raised in the calling thread
            with lock:
                failures.append(exc)
            stop.set()

    begin = time.monotonic()
    emit(Progress(name, 0, planned))
    threads = [
        threading.Thread(target=worker, name=f"storm-{name}-{i}", daemon=True)
        for i in range(min(concurrency, planned))
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        stop.set()
    if failures:
        raise failures[0]
    latencies.sort()
    result.requests = started
    result.skipped = planned - started
    result.statuses = dict(sorted(statuses.items()))
    result.errors = dict(sorted(errors.items()))
    result.styles = dict(styles)
    result.p50_ms = percentile(latencies, 50)
    result.p99_ms = percentile(latencies, 99)
    result.max_ms = percentile(latencies, 100)
    result.seconds = round(time.monotonic() - begin, 3)
    emit(Progress(name, done, planned, finished=True))
    return result


def run_storm(config: StormConfig, progress: ProgressCallback | None = None) -> StormResult:
    """Run the phases of a storm against ``config.url`` and judge the outcome.

    Every target is resolved (and checked to be loopback unless ``allow_remote``) and the
    leak oracles are read once before any load is sent.

    :param config: what to send, where, and how much.
    :param progress: called with a :class:`Progress` when each phase starts, after each
        request (from client threads, one call at a time) and when each phase finishes.
    :raises StormError: for a refused or unusable target or an unreadable oracle.

    With a stall style among ``config.abort_styles``, the stall phase
    (:ref:`storm-stall`) runs after the aborts.

    When the health check gets no answer at all and ``config.early_stop`` is set (the
    default), the final load and the last oracle reading are skipped: a dead or hung server
    would only make them wait for their timeouts. The verdict says so.

    .. versionadded:: 0.1
    """
    begin = time.monotonic()
    deadline = begin + config.max_seconds

    def target_of(url: str, what: str) -> Target:
        return resolve(urljoin(config.url, url), allow_remote=config.allow_remote, what=what)

    main_target = target_of(config.url, "target")
    health_target = target_of(config.health_path or config.url, "health URL")
    stream_target = target_of(config.stream_path, "stream URL") if config.stream_path else None
    body_target = target_of(config.body_path or config.url, "body URL")
    oracles: list[Oracle] = []
    stats_oracle: StatsOracle | None = None
    if config.stats_url:
        stats_target = target_of(config.stats_url, "stats URL")
        stats_oracle = StatsOracle(
            stats_target, config.stats_key, config.headers, config.health_timeout
        )
        oracles.append(stats_oracle)
    if config.dsn is not None and config.application_name is not None:
        oracles.append(PgOracle(config.dsn, config.application_name, config.health_timeout))

    readings = [LeakReading(oracle.source, oracle.name, oracle.label) for oracle in oracles]
    try:
        for oracle, reading, value in zip(
            oracles, readings, read_oracles(oracles, readings), strict=True
        ):
            if value is None:
                raise StormError(f"cannot read the leak oracle ({oracle.label}): {reading.error}")
            reading.before = value
            reading.error = None

        request = request_bytes(main_target, config.headers)
        normal = run_phase(
            "normal", config.normal_count, config.normal_concurrency,
            lambda _i, dl: timed_get(main_target, request, config.normal_timeout, dl),
            deadline, progress,
        )

        styles = config.quick_styles
        stream_request = request_bytes(stream_target, config.headers) if stream_target else b""
        body_request = post_head_bytes(body_target, config.headers, config.body_size) + (
            b"x" * (config.body_size // 2)
        )

        def abort_job(index: int, dl: float) -> Outcome:
            style = styles[index % len(styles)]
            own_deadline = min(time.monotonic() + config.abort_timeout, dl)
            if style == "stream" and stream_target is not None:
                return aborted_request(stream_target, stream_request, style, 0, own_deadline)
            if style == "body-reset":
                return aborted_request(
                    body_target, body_request, style, config.body_interval, own_deadline
                )
            return aborted_request(main_target, request, style, config.abort_delay, own_deadline)

        abort = run_phase(
            "abort", config.abort_count if styles else 0, config.abort_concurrency, abort_job,
            deadline, progress,
        )  # fmt: skip

        stall: StallResult | None = None
        stall_cut = False
        if config.stall_styles:
            stall = run_stall(
                config, main_target, body_target, stream_target, stats_oracle, deadline,
                progress,
            )  # fmt: skip
            stall_cut = stall.seconds < config.stall_seconds - 0.01

        drain_begin = time.monotonic()
        if progress is not None:
            progress(Progress("drain", 0, 0))
        if oracles:
            values = settle(oracles, readings, config.drain_timeout, deadline)
            for reading, value in zip(readings, values, strict=True):
                reading.after_drain = value
        else:
            time.sleep(max(0.0, min(config.drain_pause, deadline - time.monotonic())))
        drain_seconds = round(time.monotonic() - drain_begin, 3)
        if progress is not None:
            progress(Progress("drain", 0, 0, finished=True))

        health_request = request_bytes(health_target, config.headers)
        health = run_phase(
            "health", 1, 1,
            lambda _i, dl: timed_get(health_target, health_request, config.health_timeout, dl),
            deadline, progress,
        )
        stopped_early = server_dead(health) if config.early_stop else None
        if stopped_early is not None:
            final = PhaseResult("final", config.final_count)
        else:
            final = run_phase(
                "final", config.final_count, config.final_concurrency,
                lambda _i, dl: timed_get(main_target, request, config.final_timeout, dl),
                deadline, progress,
            )

        if oracles and stopped_early is None:
            if progress is not None:
                progress(Progress("settle", 0, 0))
            values = settle(oracles, readings, config.drain_timeout, deadline)
            for reading, value in zip(readings, values, strict=True):
                reading.at_end = value
            if progress is not None:
                progress(Progress("settle", 0, 0, finished=True))
    finally:
        for oracle in oracles:
            try:
                oracle.close()
            except Exception:  # closing a stats reader or a PG session must not mask results
                logger.debug("closing leak oracle %s failed", oracle.label, exc_info=True)

    deadline_hit = stall_cut or any(
        phase.skipped for phase in (normal, abort, health, final)
    )
    ok, verdict = judge(config, health, final, readings, deadline_hit, stopped_early, stall)
    return StormResult(
        config=config, normal=normal, abort=abort, health=health, final=final,
        leaks=readings, drain_seconds=drain_seconds,
        seconds=round(time.monotonic() - begin, 3), deadline_hit=deadline_hit,
        ok=ok, verdict=verdict, stopped_early=stopped_early, stall=stall,
    )

