#!/usr/bin/env python3
"""Flask-SQLAlchemy on flask-reqconn against the same app on its own QueuePool.

    python3 bench/sqla.py                      # gthread and sync, 4 rounds of 3 s per cell
    python3 bench/sqla.py --duration 1 --rounds 1 --worker-class gthread   # a smoke run
    python3 bench/sqla.py --queuepool fsqla    # against a QueuePool without pre-ping only

The app is ``benchapp.py``'s Flask-SQLAlchemy variant on its own ``QueuePool``
(``pool_size`` = ``--pool-size``, no overflow) and ``fsqlarc`` (the same models and views on
flask-reqconn's pool of the same size, through
``flask_reqconn.integrations.sqlalchemy.engine_options()``, eager checkout).

The ``QueuePool`` apps (``--queuepool``, comma-separated, the first is the reference of
the headline ratio) are by default ``fsqla-preping-recycle``, the app as it runs in
production (``SQLALCHEMY_ENGINE_OPTIONS = {"pool_pre_ping": True, "pool_recycle":
3600}``, what SQLAlchemy's docs recommend against dropped connections, and what the
options an app gives up for ``engine_options()`` usually are): this is what a user moving
such an app sees. ``fsqla`` (no pre-ping) follows as a floor: a ``QueuePool`` that never
checks its connections, which flask-reqconn's pool always does.

Endpoints ``/select1``, ``/read`` (a ``text()`` lookup), ``/orm`` (the same lookup as an
ORM model), ``/ormpage`` (``db.paginate()``: a page of 20 and its count), ``/ormwrite``
(load, update, ``commit()``, return the reloaded model: two transactions, so two
``QueuePool`` checkouts) and ``/nodb``; ``/select1`` and ``/read`` have nothing or little
to plan, the worst case for flask-reqconn (``bench/NOTES.rst``, issue 22). All variants
run under real
gunicorn at the same time and are loaded in turn, interleaved (the order rotates every
round), by ``run.py``'s HTTP matrix (``loadgen.py``: wrk if installed). Figures are
printed; with ``--save`` they also go to ``bench/results/sqla.json``. Measure on a quiet
machine; ``bench/instructions.py`` and ``bench/backend_instructions.py --apps`` count the
same apps without the noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
ENDPOINTS = ("select1", "read", "orm", "ormpage", "ormwrite", "nodb")
#: the app as it runs in production first (the headline), then the QueuePool floor
QUEUEPOOL = "fsqla-preping-recycle,fsqla"


def ratios(matrix: dict[str, Any], theirs_variant: str) -> dict[str, dict[str, float]]:
    """Per endpoint: median requests/s of each variant and of fsqlarc / *theirs_variant*
    per round."""
    out: dict[str, dict[str, float]] = {}
    for ep, by_variant in matrix["cells"].items():
        ours, theirs = by_variant["fsqlarc"], by_variant[theirs_variant]
        per_round = [a["rps"] / b["rps"] for a, b in zip(ours, theirs, strict=True) if b["rps"]]
        out[ep] = {
            "fsqla_rps": statistics.median(run["rps"] for run in theirs),
            "fsqlarc_rps": statistics.median(run["rps"] for run in ours),
            "ratio_median": statistics.median(per_round) if per_round else float("nan"),
            "ratio_min": min(per_round) if per_round else float("nan"),
            "bad": sum(run["errors"] + run["non2xx"] for run in ours + theirs),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=int, default=3, help="seconds per cell")
    parser.add_argument("--worker-class", choices=["gthread", "sync"], action="append",
                        help="only this worker class (repeatable; default both)")  # fmt: skip
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queuepool", default=QUEUEPOOL,
                        help="the QueuePool apps, comma-separated, the reference first"
                        f" (default {QUEUEPOOL}: with pre-ping, as in production, then without)")
    parser.add_argument("--endpoints", default=",".join(ENDPOINTS))
    parser.add_argument("--python-client", action="store_true", help="do not use wrk")
    parser.add_argument("--save", action="store_true", help="write bench/results/sqla.json")
    args = parser.parse_args(argv)
    theirs = [v for v in args.queuepool.split(",") if v]
    if not theirs or any(v.split("-")[0] != "fsqla" for v in theirs):
        parser.error("--queuepool takes fsqla variants (fsqla, fsqla-preping-recycle...)")
    plan = {ep: [*theirs, "fsqlarc"] for ep in args.endpoints.split(",") if ep}

    sys.path[:0] = [str(BENCH), str(ROOT)]
    import run  # the HTTP matrix, servers and CPU accounting of the main benchmark

    run.bootstrap()
    import pgsetup
    from loadgen import WRK

    force_python = args.python_client or WRK is None
    log_dir = Path(tempfile.mkdtemp(prefix="reqconn-bench-sqla-logs-"))
    results: dict[str, Any] = {
        "pool_size": args.pool_size, "queuepool": theirs, "http": {}, "ratios": {},
    }  # fmt: skip
    run.say(f"starting PostgreSQL and seeding {args.rows} rows")
    with pgsetup.bench_database(args.rows) as (dsn, admin_dsn):
        results["machine"] = run.machine_info(dsn, None if force_python else WRK)
        for wc in args.worker_class or ["gthread", "sync"]:
            matrix = run.http_matrix(
                dsn, admin_dsn, worker_class=wc, rounds=args.rounds, duration=args.duration,
                pool_size=args.pool_size, rows=args.rows, log_dir=log_dir,
                force_python=force_python, plan=plan,
            )  # fmt: skip
            results["http"][wc] = matrix
            results["ratios"][wc] = {v: ratios(matrix, v) for v in theirs}
            print("\n".join(run.http_table(matrix)), flush=True)
    for i, variant in enumerate(theirs):
        what = "what a user moving this app sees" if i == 0 else "for comparison"
        print(f"\nflask-reqconn against {run.label(variant)} ({what}):")
        print(f"{'worker':8} {'endpoint':9} {'QueuePool r/s':>14} {'reqconn r/s':>12}"
              f" {'ratio':>6} {'min':>6}")  # fmt: skip
        for wc, by_theirs in results["ratios"].items():
            for ep, row in by_theirs[variant].items():
                print(f"{wc:8} /{ep:8} {row['fsqla_rps']:14.0f} {row['fsqlarc_rps']:12.0f}"
                      f" {row['ratio_median']:6.2f} {row['ratio_min']:6.2f}"
                      + (f"  ({row['bad']} bad)" if row["bad"] else ""))  # fmt: skip
    if args.save:
        out = BENCH / "results" / "sqla.json"
        out.write_text(json.dumps(results, indent=1, default=str))
        run.say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
