#!/usr/bin/env python3
"""What the hand-back's SQL costs PostgreSQL: backend CPU per request, by statement set.

    .venv/bin/python bench/handback_sql.py [--dsn CONNINFO] [--requests 10000]

One connection plays a request over and over: ``BEGIN``, ``SELECT 1``, then one of
the endings below, each sent as one simple query (one round trip), as the hand-back
sends it. The backend's CPU time (user + system, from ``/proc``, in clock ticks) is
divided by the requests; endings alternate over rounds, and the median and the
smallest round are printed. Compare rows, not absolute values: on an idle virtual
machine every round trip also pays for waking a sleeping vCPU.

The endings are the bare pool's ``COMMIT``, flask-reqconn's hand-back with and
without its session reset, the reset without each of its statements, and the
shortened hand-back that skipping the reset would allow (issue 12, direction 2):
once with psycopg's ``BEGIN`` carrying a transaction-local marker (the only sound
way found to know that no ``COMMIT`` happened in between), once without.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import pgsetup
import psycopg
from psycopg import generators, pq
from psycopg.pq import TransactionStatus

from flask_reqconn.connection import _SQL

WRITE_CHECK = "SELECT txid_current_if_assigned() IS NOT NULL"
MARKED_BEGIN = "BEGIN; SET LOCAL reqconn.tx = 'y'"
SHORT = (
    WRITE_CHECK + ", pg_advisory_unlock_all(), current_setting('reqconn.tx', true) = 'y';"
    " ROLLBACK; DISCARD SEQUENCES"
)
FULL = _SQL[TransactionStatus.INTRANS, True].decode()
#: label: (the BEGIN, the ending)
ENDINGS: dict[str, tuple[str, str]] = {
    "COMMIT (bare pool)": ("BEGIN", "COMMIT"),
    "ROLLBACK": ("BEGIN", "ROLLBACK"),
    "write check, ROLLBACK (RESET_SESSION=False)": (
        "BEGIN",
        _SQL[TransactionStatus.INTRANS, False].decode(),
    ),
    "hand-back with reset (default)": ("BEGIN", FULL),
    **{
        f"  reset without {stmt}": ("BEGIN", FULL.replace(f" {stmt};", "").replace(f"; {stmt}", ""))
        for stmt in (
            "CLOSE ALL",
            "SET SESSION AUTHORIZATION DEFAULT",
            "RESET ALL",
            "UNLISTEN *",
            "DISCARD TEMP",
            "DISCARD SEQUENCES",
        )
    },
    "short hand-back, no marker (unsound)": (
        "BEGIN",
        WRITE_CHECK + ", pg_advisory_unlock_all(); ROLLBACK; DISCARD SEQUENCES",
    ),
    "short hand-back, marked BEGIN": (MARKED_BEGIN, SHORT),
}


def backend_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(conn: psycopg.Connection, sql: bytes) -> None:
    pgconn = conn.pgconn
    pgconn.send_query(sql)
    for result in conn.wait(generators.execute(pgconn)):
        if result.status == pq.ExecStatus.FATAL_ERROR:
            raise RuntimeError(result.error_message.decode())


def measure(dsn: str, requests: int, rounds: int) -> dict[str, list[float]]:
    per_request: dict[str, list[float]] = {label: [] for label in ENDINGS}
    with psycopg.connect(dsn) as conn:
        pid = conn.info.backend_pid
        labels = list(ENDINGS)
        for r in range(rounds):
            for label in labels if r % 2 == 0 else labels[::-1]:
                begin, ending = (s.encode() for s in ENDINGS[label])
                start = backend_cpu(pid)
                for _ in range(requests):
                    run(conn, begin)
                    run(conn, b"SELECT 1")
                    run(conn, ending)
                per_request[label].append((backend_cpu(pid) - start) / requests * 1e6)
    return per_request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", help="a database to use (default: a throwaway server)")
    parser.add_argument("--requests", type=int, default=10000, help="per ending and round")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        dsn = args.dsn or stack.enter_context(pgsetup.bench_database(10))[0]
        results = measure(dsn, args.requests, args.rounds)
    base = statistics.median(results["COMMIT (bare pool)"])
    print(f"backend CPU per request (BEGIN; SELECT 1; ending), {args.rounds} rounds"
          f" x {args.requests} requests; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"{'ending':46} {'median µs':>10} {'min µs':>8} {'- COMMIT':>9}")
    for label, values in results.items():
        median = statistics.median(values)
        print(f"{label:46} {median:10.1f} {min(values):8.1f} {median - base:+9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
