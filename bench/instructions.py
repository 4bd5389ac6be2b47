#!/usr/bin/env python3
"""Instructions per request, counted by valgrind (callgrind), per thread: noise-free A/B.

    .venv/bin/python bench/instructions.py --variants eager,bare [--pkg DIR ...] [--path /read]

Each variant's app (``benchapp.py``) serves ``/select1`` (or ``--path``) in process, as ``micro.py``
does, under ``valgrind --tool=callgrind --separate-threads=yes``, once for 100 and
once for 600 requests; the difference divided by 500 is the instructions one request
costs, without the start-up. Counted are the request thread and all threads of the
process together (the watcher's work included). Other processes on the machine
change the time but not the count, so this resolves a few thousand instructions
where timings cannot. PostgreSQL's own work is not in it, and neither are cache misses
or system calls' kernel time. ``--pkg`` (repeatable) runs each variant with the
``flask_reqconn/`` of that directory instead of the repository's.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pgsetup

BENCH = Path(__file__).resolve().parent
LOOP = """
import json, os, sys
import micro
app = micro.build(os.environ["VARIANT"], json.loads(os.environ.get("BENCH_CONFIG", "{}")))
client = micro.Client(app, os.environ.get("BENCH_PATH", "/select1"))
client.loop(int(sys.argv[1]))
micro.close_app(app)
client.close()
"""
SMALL, LARGE = 100, 600


def thread_totals(prefix: str) -> list[int]:
    """Instructions of each thread of one run (callgrind's files ``prefix.<pid>-<n>``)."""
    totals = []
    # one file per thread, ``-01`` the main one (a file without a thread number is
    # valgrind's parent process: skipped)
    for path in sorted(glob.glob(prefix + ".*-[0-9][0-9]")):
        found = re.search(r"^totals: (\d+)", Path(path).read_text(), re.M)
        totals.append(int(found.group(1)) if found else 0)
    return totals


def count(
    dsn: str, variant: str, pkg: Path | None, tmp: Path, config: str = "{}", path: str = "/select1"
) -> tuple[float, float]:
    """(request thread, all threads) instructions per request of *variant*."""
    runs = {}
    for n in (SMALL, LARGE):
        prefix = str(tmp / f"{variant}-{path.strip('/')}-{n}-{pkg.name if pkg else 'repo'}")
        env = dict(
            os.environ, BENCH_DSN=dsn, BENCH_ROWS="1000", VARIANT=variant, BENCH_CONFIG=config,
            BENCH_PATH=path,
        )  # fmt: skip
        env["PYTHONPATH"] = os.pathsep.join([*([str(pkg)] if pkg else []), str(BENCH)])
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--separate-threads=yes",
             f"--callgrind-out-file={prefix}.%p", sys.executable, "-c", LOOP, str(n)],
            env=env, capture_output=True, check=True, cwd="/",
        )  # fmt: skip
        runs[n] = thread_totals(prefix)
    main = (runs[LARGE][0] - runs[SMALL][0]) / (LARGE - SMALL)
    total = (sum(runs[LARGE]) - sum(runs[SMALL])) / (LARGE - SMALL)
    return main, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="bare,eager,lazy")
    parser.add_argument("--pkg", type=Path, action="append", default=[],
                        help="a directory holding a flask_reqconn/ to count instead")
    parser.add_argument("--config", default="{}",
                        help='extra app settings, as JSON: \'{"REQCONN_RESET_SESSION": false}\'')
    parser.add_argument("--dsn", help="a seeded bench database (default: a throwaway one)")
    parser.add_argument("--path", default="/select1",
                        help="the endpoint each request asks for (comma-separated: each in turn)")
    args = parser.parse_args(argv)
    pkgs: list[Path | None] = [p.resolve() for p in args.pkg] or [None]
    with contextlib.ExitStack() as stack:
        dsn = args.dsn or stack.enter_context(pgsetup.bench_database(1000))[0]
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        for path, variant, pkg in itertools.product(
            args.path.split(","), args.variants.split(","), pkgs
        ):
            main_thread, total = count(dsn, variant, pkg, Path(tmp), args.config, path)
            print(f"{variant:24} {path:10} {str(pkg or 'repository'):24} request thread"
                  f" {main_thread:10,.0f}  all threads {total:10,.0f} instructions/request",
                  flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
