#!/usr/bin/env python3
"""What a request's ending costs the app: instructions per ending, by way of sending it.

    .venv/bin/python bench/handback_client.py [--dsn CONNINFO]

One connection plays a request over and over (``SELECT 1``, then the ending) under
``valgrind --tool=callgrind``, once for 100 and once for 600 requests; the difference
divided by 500 is what one costs (as ``instructions.py`` counts). The endings: the bare
pool's ``commit()``; flask-reqconn's hand-back (rollback, write check, session reset)
sent as before 0fd520a, through psycopg's wait with a result object per statement;
and as now, through libpq's ``PQexec`` (``flask_reqconn.connection.clean_connection``).
PostgreSQL's side of the same endings is ``handback_sql.py``'s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pgsetup
from instructions import LARGE, SMALL, thread_totals

BENCH = Path(__file__).resolve().parent
LOOP = """
import sys, psycopg
from psycopg import generators
from flask_reqconn import connection
conn = psycopg.connect(sys.argv[1])
baseline = connection.Baseline(autocommit=False, row_factory=conn.row_factory)
# the hand-back of a transaction that wrote nothing, as it was sent before 0fd520a
OLD = (
    b"SELECT txid_current_if_assigned() IS NOT NULL, pg_advisory_unlock_all(); ROLLBACK;"
    b" CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *;"
    b" DISCARD TEMP; DISCARD SEQUENCES"
)
ending, n = sys.argv[2], int(sys.argv[3])
pgconn = conn.pgconn
for _ in range(n):
    conn.execute("SELECT 1")
    if ending == "commit":
        conn.commit()
    elif ending == "old":
        with conn.lock:
            pgconn.send_query(OLD)
            conn.wait(generators.execute(pgconn))
        connection.restore_attributes(conn, baseline)
    else:
        connection.clean_connection(conn, baseline, reset_session=True)
"""
ENDINGS = {
    "commit": "psycopg's commit() (the bare pool)",
    "old": "hand-back through psycopg's wait (before)",
    "now": "hand-back through PQexec (now)",
}


def count(dsn: str, ending: str, tmp: Path) -> float:
    runs = {}
    for n in (SMALL, LARGE):
        prefix = str(tmp / f"{ending}-{n}")
        subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={prefix}.%p-01",
             sys.executable, "-c", LOOP, dsn, ending, str(n)],
            capture_output=True, check=True, cwd="/", env=dict(os.environ),
        )  # fmt: skip
        runs[n] = sum(thread_totals(prefix))
    return (runs[LARGE] - runs[SMALL]) / (LARGE - SMALL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", help="a database to connect to (default: a throwaway one)")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        dsn = args.dsn or stack.enter_context(pgsetup.bench_database(10))[0]
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for ending, label in ENDINGS.items():
            print(f"{label:44} {count(dsn, ending, tmp):10,.0f} instructions per request",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
