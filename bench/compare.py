#!/usr/bin/env python3
"""A/B two copies of flask_reqconn: the repository's, and a patched one elsewhere.

    .venv/bin/python bench/compare.py --alt /tmp/patched   # holds flask_reqconn/

To try a change without touching the repository, copy ``flask_reqconn/`` to a
directory, edit it there, and point ``--alt`` at that directory. Both copies run:

1. in process: ``micro.py``'s per-request loop (CPU µs, 10th percentile), the two
   copies alternating in separate processes;
2. under gunicorn gthread and sync (``--worker-class``): each variant served by each
   copy (and the bare pool and plain Flask as references), loaded in turn over several
   rounds; req/s and the CPU per request of the app workers plus their PostgreSQL
   backends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pgsetup
from run import SERVERS, backend_pids, measured_load, say, warm

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

MICRO_CASES = [
    "plain /nodb", "lazy /nodb", "eager /nodb (checks out)", "bare /select1",
    "eager /select1", "lazy /select1",
]  # fmt: skip
# (server name, variant, package dir or None for the repository's)
HTTP_ENDPOINTS = {
    "select1": ["bare", "eager", "eager@alt", "lazy", "lazy@alt"],
    "read": ["bare", "eager", "eager@alt"],
    "nodb": ["plain", "lazy", "lazy@alt", "eager", "eager@alt"],
}


def micro_ab(dsn: str, alt: Path, base: Path | None, repeats: int) -> dict[str, Any]:
    cpu: dict[str, dict[str, list[float]]] = {"base": {}, "alt": {}}
    for i in range(repeats):
        for which in ("base", "alt") if i % 2 == 0 else ("alt", "base"):
            pkg = alt if which == "alt" else base
            env = dict(os.environ)
            env["PYTHONPATH"] = str(pkg) if pkg else ""
            out = subprocess.run(
                [sys.executable, str(BENCH / "micro.py"), "--dsn", dsn, "--rounds", "6",
                 "--per-request-only", ",".join(MICRO_CASES)],
                env=env, capture_output=True, text=True, check=True, cwd="/",
            )  # fmt: skip
            for label, values in json.loads(out.stdout)["cpu"].items():
                cpu[which].setdefault(label, []).extend(values)
    table = {}
    for label in MICRO_CASES:
        b, a = sorted(cpu["base"][label]), sorted(cpu["alt"][label])
        table[label] = {
            "base_cpu_p10": b[len(b) // 10],
            "alt_cpu_p10": a[len(a) // 10],
            "base_cpu_median": statistics.median(b),
            "alt_cpu_median": statistics.median(a),
        }
    return table


def appname_of(name: str) -> str:
    return "bench_" + name.replace("-", "_").replace("@", "_")


def start(name: str, dsn: str, alt: Path, base: Path | None, log_dir: Path,
          worker_class: str) -> Any:
    variant, _, which = name.partition("@")
    pkg = alt if which == "alt" else base
    pythonpath = f"{pkg},{BENCH}" if pkg else str(BENCH)
    workers, threads, _ = SERVERS[worker_class]
    from flask_reqconn.testing import gunicorn

    return gunicorn(
        "benchapp:create_app()", worker_class=worker_class, workers=workers, threads=threads,
        extra_args=["--pythonpath", pythonpath, "--log-level", "warning"],
        env={"BENCH_VARIANT": variant, "BENCH_DSN": dsn, "BENCH_POOL_SIZE": "4",
             "BENCH_APPNAME": appname_of(name)},
        log_dir=log_dir,
    )  # fmt: skip


def http_ab(dsn: str, admin_dsn: str, alt: Path, base: Path | None, rounds: int,
            duration: int, worker_class: str = "gthread") -> dict[str, Any]:
    names = sorted({n for ns in HTTP_ENDPOINTS.values() for n in ns})
    connections = SERVERS[worker_class][2]
    rps: dict[str, dict[str, list[float]]] = {ep: {n: [] for n in ns} for ep, ns in
                                              HTTP_ENDPOINTS.items()}
    cpu: dict[str, dict[str, list[float]]] = {ep: {n: [] for n in ns} for ep, ns in
                                              HTTP_ENDPOINTS.items()}
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp, \
            contextlib.ExitStack() as stack:
        srv = {}
        for name in names:
            srv[name] = start(name, dsn, alt, base, Path(tmp), worker_class)
            stack.callback(srv[name].stop)
            warm(srv[name], ["/nodb"] if name == "plain" else ["/select1", "/read", "/nodb"])
        pids = {
            name: (
                srv[name].worker_pids(),
                [] if name == "plain" else backend_pids(admin_dsn, name, appname_of(name)),
            )
            for name in names
        }
        for r in range(rounds):
            for ep, order in HTTP_ENDPOINTS.items():
                order = order[r % len(order):] + order[: r % len(order)]
                for name in order if r % 2 == 0 else order[::-1]:
                    res = measured_load(srv[name], pids[name], f"{srv[name].url}/{ep}",
                                        connections=connections, duration=duration,
                                        force_python=False)
                    rps[ep][name].append(res["rps"])
                    cpu[ep][name].append(res["app_cpu_us"] + (res["db_cpu_us"] or 0.0))
                say(f"compare {worker_class} round {r + 1}/{rounds} /{ep}: "
                    + ", ".join(f"{n} {rps[ep][n][-1]:.0f}/s {cpu[ep][n][-1]:.0f}µs"
                                for n in order))
    out: dict[str, Any] = {}
    for ep, by_name in rps.items():
        ref = "plain" if ep == "nodb" else "bare"
        out[ep] = {
            name: {
                "rps_median": statistics.median(values),
                "ratio_to_ref": statistics.median(
                    v / w for v, w in zip(values, by_name[ref], strict=True)
                ),
                "cpu_us_median": statistics.median(cpu[ep][name]),
                "cpu_ratio_to_ref": statistics.median(
                    v / w for v, w in zip(cpu[ep][name], cpu[ep][ref], strict=True)
                ),
                "ref": ref,
            }
            for name, values in by_name.items()
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alt", type=Path, required=True,
                        help="directory holding the patched flask_reqconn/")
    parser.add_argument("--base", type=Path, help="directory holding the base copy"
                        " (default: the repository's)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=int, default=3)
    parser.add_argument("--micro-repeats", type=int, default=4)
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--worker-class", choices=["gthread", "sync"], action="append",
                        help="gunicorn worker class (repeatable; default: gthread, then sync)")
    parser.add_argument("--skip-micro", action="store_true")
    parser.add_argument("--endpoints", help="comma-separated subset of "
                        + ",".join(HTTP_ENDPOINTS) + " (default: all)")
    args = parser.parse_args(argv)
    if args.endpoints:
        wanted = args.endpoints.split(",")
        unknown = set(wanted) - set(HTTP_ENDPOINTS)
        if unknown:
            parser.error(f"unknown endpoints: {', '.join(sorted(unknown))}")
        for ep in list(HTTP_ENDPOINTS):
            if ep not in wanted:
                del HTTP_ENDPOINTS[ep]
    for pkg in (args.alt, args.base):
        if pkg is not None and not (pkg / "flask_reqconn" / "__init__.py").is_file():
            parser.error(f"{pkg} has no flask_reqconn/ package")
    with pgsetup.bench_database(100_000) as (dsn, admin_dsn):
        result: dict[str, Any] = {}
        if not args.skip_micro:
            say("in-process A/B")
            micro = micro_ab(dsn, args.alt.resolve(), args.base, args.micro_repeats)
            print(f"{'case':28} {'base CPU p10':>12} {'alt CPU p10':>12} {'Δ µs':>7}")
            for label, row in micro.items():
                delta = row["alt_cpu_p10"] - row["base_cpu_p10"]
                print(f"{label:28} {row['base_cpu_p10']:12.1f} {row['alt_cpu_p10']:12.1f}"
                      f" {delta:7.1f}")
            result["micro"] = micro
        for wc in [] if args.skip_http else args.worker_class or ["gthread", "sync"]:
            say(f"gunicorn {wc} A/B")
            result[f"http_{wc}"] = http_ab(dsn, admin_dsn, args.alt.resolve(), args.base,
                                           args.rounds, args.duration, wc)
            for ep, rows in result[f"http_{wc}"].items():
                for name, row in rows.items():
                    print(f"{wc:7} /{ep:8} {name:10} {row['rps_median']:8.0f} req/s"
                          f"  ÷ {row['ref']} {row['ratio_to_ref']:.3f}"
                          f"   CPU {row['cpu_us_median']:6.0f} µs/req"
                          f"  ÷ {row['ref']} {row['cpu_ratio_to_ref']:.3f}", flush=True)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
