#!/usr/bin/env python3
"""Issue 12, direction 6: would handing back after the body is written cut latency?

    .venv/bin/python bench/latency.py [--connections 1] [--rounds 5] [--duration 3]

Flask runs ``teardown_request`` (flask-reqconn's hand-back, one round trip) before the
server writes a non-streamed body. This starts, under gunicorn gthread (1 worker x 4
threads, pool 4), the bare pool, eager checkout, and eager checkout from a copy of
``flask_reqconn`` patched so that every response is handed back by the WSGI wrapper when
the server closes the response (after the write), as streamed bodies are. Each is loaded
in turn by wrk (``--connections`` keep-alive clients), the order alternating by round;
the first round is a warm-up. Printed: median p50 and p99 latency and req/s per endpoint.
Nothing is saved. The patched copy is an experiment, not a mode of the library.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import loadgen
import pgsetup
from compare import ROOT, start
from run import say

#: the one change of the experiment: after_request marks every response as streamed
_PATCH_AT = (
    "    if response.is_streamed and body_may_use_connection(response.response):\n"
    "        req.streamed = True\n"
)
_PATCH = _PATCH_AT + "    elif not response.is_streamed:\n        req.streamed = True\n"


def patched_copy(into: Path) -> Path:
    """A copy of the repository's flask_reqconn that hands back after the write."""
    shutil.copytree(ROOT / "flask_reqconn", into / "flask_reqconn")
    checkout = into / "flask_reqconn" / "checkout.py"
    text = checkout.read_text()
    if _PATCH_AT not in text:
        raise SystemExit("checkout.after_request changed: update bench/latency.py's patch")
    checkout.write_text(text.replace(_PATCH_AT, _PATCH))
    return into


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, pgsetup.bench_database(100_000) as (dsn, _):
        late = patched_copy(Path(tmp))
        # compare.py's servers: "@alt" runs the patched copy
        plan = {"bare": "bare", "eager": "eager", "eager, after the write": "eager@alt"}
        servers = {}
        try:
            for label, name in plan.items():
                servers[label] = start(name, dsn, late, None, Path(tmp), "gthread")
            for endpoint in ("select1", "read"):
                figures: dict[str, list[dict[str, float]]] = {label: [] for label in servers}
                for r in range(args.rounds):
                    order = list(servers) if r % 2 == 0 else list(reversed(servers))
                    for label in order:
                        url = f"{servers[label].url}/{endpoint}"
                        out = loadgen.run_load(
                            url, connections=args.connections, duration=args.duration
                        )
                        if r:  # round 0 warms up
                            figures[label].append(out)
                for label, runs in figures.items():
                    say(
                        f"/{endpoint} c={args.connections} {label:24}"
                        f" p50 {statistics.median(o['p50_ms'] for o in runs):.3f} ms"
                        f"  p99 {statistics.median(o['p99_ms'] for o in runs):.3f} ms"
                        f"  {statistics.median(o['rps'] for o in runs):.0f} req/s"
                    )
        finally:
            for server in servers.values():
                server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
