"""The stall phase: clients that stay and stall while probes check that the app answers.

See :ref:`storm-stall`. The clients are :func:`~.client.stalled_request`'s; what the phase
found about the front end is worded by :func:`~.report.front_end_finding`.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import Counter
from collections.abc import Sequence

from .client import Outcome, Target, post_head_bytes, request_bytes, stalled_request, timed_get
from .config import MAX_REQUESTS_PER_PHASE, StormConfig
from .oracles import StatsOracle, gone_in_json, pool_max_in_json
from .report import front_end_finding
from .results import PhaseResult, Progress, ProgressCallback, StallResult, percentile

logger = logging.getLogger(__name__)


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
        p50_ms=percentile(latencies, 50), p99_ms=percentile(latencies, 99),
        max_ms=percentile(latencies, 100), seconds=round(seconds, 3),
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
