"""Disconnect-to-cancel latency, and the watcher's cost on a short-query endpoint.

    .venv/bin/python bench/cancel.py [--aborts 200] [--rounds 4] [--duration 5]

1. **Latency.** gunicorn gthread, pool 8. Each client sends ``GET /sleep`` (a
   ``pg_sleep(30)``), waits until the query runs, closes the socket and notes
   the time; the view notes when ``QueryCanceled`` reached it. Same machine,
   same clock: the difference is close-to-cancelled.
2. **Overhead.** Two servers, watcher on (policy ``safe``) and off (``off``),
   loaded in turn (A B A B ...) on ``GET /one`` (``select 1``) with wrk (or the
   Python client), the ratio of medians reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from loadgen import run_load
from pgsetup import bench_database

from flask_reqconn.testing import gunicorn, http_get, raw_connect

ROOT = Path(__file__).resolve().parent.parent

APP = "bench.cancelapp:create_app()"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def latency(dsn: str, admin_dsn: str, aborts: int, log_dir: Path) -> dict[str, Any]:
    log_path = log_dir / "cancelled.txt"
    server = gunicorn(
        APP, worker_class="gthread", threads=16, log_dir=log_dir, cwd=ROOT,
        env={"RC_DSN": dsn, "RC_POOL": "8", "RC_CANCEL": "safe", "RC_CANCEL_LOG": str(log_path)},
    )  # fmt: skip
    closed: dict[str, float] = {}
    lock = threading.Lock()
    concurrency = 8
    try:
        def client(worker: int) -> None:
            for i in range(worker, aborts, concurrency):
                sock = raw_connect(server.url)
                sock.sendall(f"GET /sleep?id={i}&s=30 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                time.sleep(0.15)  # let the query start
                t0 = time.time()
                sock.close()
                with lock:
                    closed[str(i)] = t0
                time.sleep(0.05)

        threads = [threading.Thread(target=client, args=(w,)) for w in range(concurrency)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(600)
        stats: dict[str, Any] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            _, _, body = http_get(server.url + "/_stats")
            stats = json.loads(body)
            if stats["checked_out"] == 0:
                break
            time.sleep(0.2)
    finally:
        server.stop()
    cancelled = {}
    for line in log_path.read_text().splitlines() if log_path.exists() else []:
        rid, ts = line.split()
        cancelled[rid] = float(ts)
    ms = [(cancelled[rid] - t0) * 1000 for rid, t0 in closed.items() if rid in cancelled]
    return {
        "aborted": len(closed),
        "cancelled": len(ms),
        "p50_ms": round(percentile(ms, 0.50), 2) if ms else None,
        "p99_ms": round(percentile(ms, 0.99), 2) if ms else None,
        "max_ms": round(max(ms), 2) if ms else None,
        "checked_out_after": stats.get("checked_out"),
        "watcher_cancels": stats.get("cancelled"),
    }


def overhead(dsn: str, rounds: int, duration: float, log_dir: Path) -> dict[str, Any]:
    started = {
        policy: gunicorn(
            APP, worker_class="gthread", threads=4, log_dir=log_dir, cwd=ROOT,
            env={"RC_DSN": dsn, "RC_POOL": "4", "RC_CANCEL": policy},
        )  # fmt: skip
        for policy in ("safe", "off")
    }
    results: dict[str, list[float]] = {"safe": [], "off": []}
    try:
        for server in started.values():  # warm up
            run_load(server.url + "/one", connections=8, duration=1)
        for r in range(rounds):
            order = ("safe", "off") if r % 2 == 0 else ("off", "safe")
            for policy in order:
                out = run_load(started[policy].url + "/one", connections=8, duration=duration)
                results[policy].append(float(out["rps"]))
    finally:
        for server in started.values():
            server.stop()
    on, off = statistics.median(results["safe"]), statistics.median(results["off"])
    return {
        "rps_watcher_on": round(on, 1),
        "rps_watcher_off": round(off, 1),
        "ratio_on_to_off": round(on / off, 4),
        "rounds": {k: [round(v) for v in vs] for k, vs in results.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aborts", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-cancel-") as tmp, \
            bench_database(rows=100) as (dsn, admin_dsn):  # fmt: skip
        log_dir = Path(tmp)
        results = {
            "machine": {"nproc": os.cpu_count(), "python": sys.version.split()[0]},
            "latency": latency(dsn, admin_dsn, args.aborts, log_dir),
            "overhead": overhead(dsn, args.rounds, args.duration, log_dir),
        }
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
