"""The demo's side-by-side tables (examples/demo.py), on storm results made by hand.

The demo itself runs in ``python3 scripts/dev.py demo``; the storms behind it are tested
in tests/test_matrix.py. Here: what the table says after an early stop.
"""

from __future__ import annotations

from typing import Any

from examples.demo import Outcome, side_by_side, stall_side_by_side
from flask_reqconn.storm import StallResult, StormConfig
from flask_reqconn.storm.results import LeakReading, PhaseResult, StormResult


def result(*, stopped_early: str | None, pg: LeakReading, final_ok: int) -> StormResult:
    final = PhaseResult("final", planned=20, requests=0 if stopped_early else 20,
                        statuses={200: final_ok} if final_ok else {})  # fmt: skip
    return StormResult(
        config=StormConfig("http://127.0.0.1:1/"),
        normal=PhaseResult("normal", planned=1, requests=1, statuses={200: 1}),
        abort=PhaseResult("abort", planned=1, requests=1, aborted=1),
        health=PhaseResult("health", planned=1, requests=1, statuses={200: 1}, p50_ms=1.0),
        final=final,
        leaks=[pg],
        drain_seconds=0.1,
        seconds=1.0,
        deadline_hit=False,
        ok=stopped_early is None,
        verdict="FAIL: ..." if stopped_early else "OK: ...",
        stopped_early=stopped_early,
    )


def rows(*outcomes: Outcome) -> dict[str, list[str]]:
    table: dict[str, list[str]] = {}
    for line in side_by_side(list(outcomes)).splitlines()[1:]:
        cells = [c for c in line.split("  ") if c.strip()]
        table[cells[0].strip()] = [c.strip() for c in cells[1:]]
    return table


def pg_reading(**readings: Any) -> LeakReading:
    return LeakReading("pg", "non-idle sessions", "pg", before=0, **readings)


def test_after_an_early_stop_the_table_says_so_and_shows_the_drain_reading() -> None:
    naive = Outcome("naive", "n", result(stopped_early="health check failed",
                                         pg=pg_reading(after_drain=0), final_ok=0))  # fmt: skip
    fixed = Outcome("flask-reqconn", "f", result(stopped_early=None,
                                                 pg=pg_reading(after_drain=0, at_end=0),
                                                 final_ok=20))  # fmt: skip
    table = rows(naive, fixed)
    assert table["final load"] == ["not sent: stopped early", "20/20 2xx (100%)"]
    assert table["busy (pg_stat_activity oracle)"] == ["0 (after the drain)", "0"]


def test_a_reading_that_could_not_be_taken_is_a_question_mark() -> None:
    gone = Outcome("x", "x", result(stopped_early="down", pg=pg_reading(), final_ok=0))
    assert rows(gone)["busy (pg_stat_activity oracle)"] == ["?"]


def test_the_stall_table_shows_probes_the_pool_and_the_front_end() -> None:
    def with_stall(probes: dict[int, int], held: list[int], stuck: bool, front: str,
                   saw: bool | None) -> StormResult:  # fmt: skip
        base = result(stopped_early=None, pg=pg_reading(after_drain=0, at_end=0), final_ok=20)
        base.leaks = [LeakReading("stats", "checked_out", "stats", before=0, after_drain=0,
                                  at_end=0)]  # fmt: skip
        base.stall = StallResult(
            clients=PhaseResult("stall", planned=5, requests=5, aborted=5),
            probes=PhaseResult("probes", planned=sum(probes.values()),
                               requests=sum(probes.values()), statuses=probes,
                               max_ms=5003.0 if 500 in probes else 13.6),
            seconds=8.0, pool_size=2, checked_out=held, stuck=stuck,
            stuck_seconds=7.8 if stuck else 0.0, app_saw_bodies=saw, front_end=front,
        )  # fmt: skip
        return base

    naive = Outcome("naive", "n", with_stall({200: 1, 500: 1}, [2, 2], True,
                                             "the app holds a connection ...", True))
    fixed = Outcome("flask-reqconn", "f", with_stall({200: 37}, [1, 1], False,
                                                     "the app sees ...", True))
    behind = Outcome("proxied", "p", with_stall({200: 30}, [0, 0], False,
                                                "... your proxy buffers ...", False))
    table: dict[str, list[str]] = {}
    for line in stall_side_by_side([naive, fixed, behind]).splitlines()[1:]:
        cells = [c.strip() for c in line.split("  ") if c.strip()]
        table[cells[0]] = cells[1:]
    assert table["probes of / during the stall"] == [
        "1/2 2xx (500:1), slowest 5.0 s", "37/37 2xx, slowest 14 ms", "30/30 2xx, slowest 14 ms",
    ]  # fmt: skip
    assert table["checked_out during the stall"] == [
        "2-2 of 2, stuck for 7.8 s", "1-1 of 2", "0-0 of 2",
    ]
    assert table["slow request bodies"] == [
        "reach the app, hold a connection", "reach the app, hold nothing", "a proxy buffers them",
    ]  # fmt: skip
