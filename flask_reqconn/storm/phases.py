"""The storm's phases: a bounded, threaded runner for one phase, the stall phase, and all
of them in order."""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from urllib.parse import urljoin

from .client import (
    Outcome,
    Target,
    aborted_request,
    post_head_bytes,
    request_bytes,
    resolve,
    stalled_request,
    timed_get,
)
from .config import MAX_REQUESTS_PER_PHASE, StormConfig, StormError
from .oracles import (
    Oracle,
    PgOracle,
    StatsOracle,
    gone_in_json,
    pool_max_in_json,
    read_oracles,
    settle,
)
from .report import front_end_finding, judge, server_dead
from .results import (
    LeakReading,
    PhaseResult,
    Progress,
    ProgressCallback,
    StallResult,
    StormResult,
)

logger = logging.getLogger("flask_reqconn.storm")


def _percentile(ordered: Sequence[float], pct: float) -> float | None:
    if not ordered:
        return None
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return round(ordered[rank - 1], 3)


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
    result.p50_ms = _percentile(latencies, 50)
    result.p99_ms = _percentile(latencies, 99)
    result.max_ms = _percentile(latencies, 100)
    result.seconds = round(time.monotonic() - begin, 3)
    emit(Progress(name, done, planned, finished=True))
    return result


def _tally(name: str, planned: int, outcomes: Sequence[Outcome], seconds: float) -> PhaseResult:
    """A :class:`PhaseResult` of outcomes collected by hand (the stall phase)."""
    latencies = sorted(o.latency_ms for o in outcomes)
    statuses = Counter(o.status for o in outcomes if o.status is not None)
    errors = Counter(o.error for o in outcomes if o.error is not None)
    styles = Counter(o.style for o in outcomes if o.style is not None)
    return PhaseResult(
        name=name, planned=planned, requests=len(outcomes),
        statuses=dict(sorted(statuses.items())), errors=dict(sorted(errors.items())),
        aborted=sum(o.aborted for o in outcomes), styles=dict(sorted(styles.items())),
        p50_ms=_percentile(latencies, 50), p99_ms=_percentile(latencies, 99),
        max_ms=_percentile(latencies, 100), seconds=round(seconds, 3),
    )  # fmt: skip


#: Seconds between readings of the stats oracle during the stall.
_STALL_POLL = 0.25
#: Probes start this long after the stalled clients, once they are in.
_STALL_RAMP = 0.5
#: The longest wait, after the stall, for the app to count the requests reset mid-body.
_GONE_PATIENCE = 3.0


def _read_stats(stats: StatsOracle | None) -> object | None:
    if stats is None:
        return None
    try:
        return stats.read_json()
    except Exception as exc:  # a reading that fails is a gap, not a crash
        logger.debug("stats oracle failed during the stall: %r", exc)
        return None


def run_stall(
    config: StormConfig,
    main_target: Target,
    body_target: Target,
    stream_target: Target | None,
    stats: StatsOracle | None,
    deadline: float,
    progress: ProgressCallback | None,
) -> StallResult:
    """The stall phase: ``stall_count`` clients that stay and stall for ``stall_seconds``,
    round-robin over ``config.stall_styles``, while probes GET the URL one after another
    and the stats oracle is read every quarter second.

    Each body client starts a new request when the server answers its stalled one (a 408,
    say), until the stall ends, when it resets its connection; a ``stop-reading`` client
    holds its one stream to the end. Every loop is bounded by the end of the stall and by
    :data:`MAX_REQUESTS_PER_PHASE`.
    """
    styles = config.stall_styles
    begin = time.monotonic()
    window_end = min(begin + config.stall_seconds, deadline)
    body_head = post_head_bytes(body_target, config.headers, config.body_size)
    stream_request = request_bytes(stream_target, config.headers) if stream_target else b""
    probe_request = request_bytes(main_target, config.headers)
    clients = [styles[i % len(styles)] for i in range(config.stall_count)]
    outcomes: list[Outcome] = []
    probes: list[Outcome] = []
    lock = threading.Lock()
    failures: list[BaseException] = []
    started = 0

    before = _read_stats(stats)
    gone_before = gone_in_json(before) if before is not None else None
    pool_size = config.pool_size or (pool_max_in_json(before) if before is not None else None)
    if progress is not None:
        progress(Progress("stall", 0, len(clients)))

    def client(style: str) -> None:
        nonlocal started
        try:
            while time.monotonic() < window_end:
                with lock:
                    if started >= MAX_REQUESTS_PER_PHASE:
                        return
                    started += 1
                began = time.monotonic()
                if style == "stop-reading" and stream_target is not None:
                    outcome = stalled_request(
                        stream_target, stream_request, style, body_size=config.body_size,
                        body_interval=config.body_interval, window_end=window_end,
                    )  # fmt: skip
                else:
                    outcome = stalled_request(
                        body_target, body_head, style, body_size=config.body_size,
                        body_interval=config.body_interval, window_end=window_end,
                    )  # fmt: skip
                with lock:
                    outcomes.append(outcome)
                if style == "stop-reading":
                    return  # one stream per client: a new one would only start over
                if time.monotonic() - began < 0.1:  # answered at once: do not spin
                    time.sleep(max(0.0, min(0.1, window_end - time.monotonic())))
        except BaseException as exc:  # re-raised in the calling thread
            with lock:
                failures.append(exc)

    def prober() -> None:
        try:
            time.sleep(max(0.0, min(_STALL_RAMP, window_end - time.monotonic())))
            while time.monotonic() < window_end:
                outcome = timed_get(
                    main_target, probe_request, config.probe_timeout,
                    window_end + config.probe_timeout,
                )  # fmt: skip
                with lock:
                    probes.append(outcome)
                time.sleep(max(0.0, min(config.probe_interval, window_end - time.monotonic())))
        except BaseException as exc:
            with lock:
                failures.append(exc)

    threads = [
        threading.Thread(target=client, args=(style,), name=f"storm-stall-{i}", daemon=True)
        for i, style in enumerate(clients)
    ]
    threads.append(threading.Thread(target=prober, name="storm-probe", daemon=True))
    for thread in threads:
        thread.start()
    readings: list[tuple[float, int]] = []
    while time.monotonic() < window_end and not failures:
        data = _read_stats(stats)
        if data is not None and stats is not None:
            try:
                readings.append((time.monotonic(), stats.count(data)))
            except ValueError:
                pass
        time.sleep(max(0.0, min(_STALL_POLL, window_end - time.monotonic())))
    for thread in threads:
        thread.join(max(0.0, window_end + config.probe_timeout + 5 - time.monotonic()))
    if failures:
        raise failures[0]
    seconds = time.monotonic() - begin

    bodies_reset = sum(o.reset_mid_body for o in outcomes)
    answered: int | None = None
    if gone_before is not None:
        patience = time.monotonic() + min(_GONE_PATIENCE, max(0.0, deadline - time.monotonic()))
        while True:
            after = _read_stats(stats)
            gone_after = gone_in_json(after) if after is not None else None
            if gone_after is not None:
                answered = gone_after - gone_before
            if (answered is not None and answered >= bodies_reset) or (
                time.monotonic() >= patience
            ):
                break
            time.sleep(_STALL_POLL)

    values = [value for _t, value in readings]
    stuck_seconds: float | None = None
    if pool_size is not None and readings:
        run_start: float | None = None
        for when, value in readings:
            if value >= pool_size:
                run_start = when if run_start is None else run_start
            else:
                run_start = None
        stuck_seconds = round(readings[-1][0] - run_start, 2) if run_start is not None else 0.0
    window = window_end - begin
    stop_clients = clients.count("stop-reading")
    body_clients = len(clients) - stop_clients
    held: bool | None = None
    if values and body_clients:
        baseline = stop_clients if pool_size is None else min(pool_size, stop_clients)
        want = body_clients if pool_size is None else min(pool_size - baseline, body_clients)
        held = want > 0 and statistics.median(values) - baseline >= want
    saw, text = front_end_finding(
        body_clients=body_clients, bodies_reset=bodies_reset, answered=answered, held=held,
        stats=stats is not None,
    )  # fmt: skip
    result = StallResult(
        clients=_tally("stall", len(clients), outcomes, seconds),
        probes=_tally("probes", len(probes), probes, seconds),
        seconds=round(window, 3),
        pool_size=pool_size,
        checked_out=values,
        stuck_seconds=stuck_seconds,
        stuck=stuck_seconds is not None and stuck_seconds >= window / 2,
        body_clients=body_clients,
        bodies_reset=bodies_reset,
        answered_by_app=answered,
        app_saw_bodies=saw,
        front_end=text,
    )
    if progress is not None:
        progress(Progress("stall", len(clients), len(clients), finished=True))
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

