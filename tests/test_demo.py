"""The demo's side-by-side table (examples/demo.py), on storm results made by hand.

The demo itself runs in ``python3 scripts/dev.py demo``; the storms behind it are tested
in tests/test_matrix.py. Here: what the table says after an early stop.
"""

from __future__ import annotations

from typing import Any

from examples.demo import Outcome, side_by_side
from flask_reqconn.storm import StormConfig
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
