"""Database and network faults, side by side: flask-reqconn, bare psycopg_pool, and
psycopg_pool with ``check=ConnectionPool.check_connection``.

    .venv/bin/python bench/faults.py            # every fault, full length (about 6 minutes)
    .venv/bin/python bench/faults.py --quick    # short faults (about 3 minutes)
    .venv/bin/python bench/faults.py --faults idle_kill,freeze --drop 10

Needs root for the silent drop (the server lives in a network namespace; see
``tests/fix_faults.py``); ``--no-drop`` runs the rest on a loopback server without root.

For each fault, four gunicorn gthread servers (1 worker, 8 threads), one per variant of
``tests/apps/faultapp.py`` (pool of 4, checkout timeout 2 s; ``hold`` is flask-reqconn with
``REQCONN_MAX_HOLD = 3``), serve the same PostgreSQL at
the same time; each has 6 client threads looping on ``/select1`` (``/sleep?s=0.5`` for the
busy kill), one fresh connection per request, each request bounded by ``--client-timeout``.
After a warm-up the fault is applied to all three at once:

``idle_kill``        clients paused, the pools' idle connections terminated, clients resumed
``busy_kill``        the backends running a query terminated
``restart_fast``     ``pg_ctl restart -m fast``
``restart_immediate`` ``pg_ctl restart -m immediate`` (a crash and recovery)
``drop``             every packet of the path dropped silently for ``--drop`` seconds
``freeze``           every PostgreSQL process stopped (SIGSTOP) for ``--freeze`` seconds

and the load goes on for ``--recovery`` seconds after the fault ends. Reported per fault and
variant, over the requests that ended after the fault began: the statuses the clients saw
(``hang``: no answer within the client timeout; ``error``: the connection failed), the
longest request, the time from the end of the fault to the first 200, and the non-200
answers to requests started after that first 200 ("errors after recovery").

On this shared machine throughput means nothing; statuses, hangs and recovery times do.
Results go to ``bench/results/faults.txt`` and ``faults.json``; the copies kept in the
repository are named for the run: ``faults-quick.txt`` (after) and ``faults-*-before.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.loadgen import check_loopback  # noqa: E402
from tests import pg, servers  # noqa: E402
from tests.fix_faults import FaultServer, FaultSetupError, fault_server  # noqa: E402

APP = "tests.apps.faultapp:create_app()"
VARIANTS = ("reqconn", "hold", "bare", "check")
VARIANT_TITLES = {
    "reqconn": "flask-reqconn (defaults)",
    "hold": "flask-reqconn MAX_HOLD=3",
    "bare": "psycopg_pool",
    "check": "psycopg_pool check=",
}
FAULTS = ("idle_kill", "busy_kill", "restart_fast", "restart_immediate", "drop", "freeze")
RESULTS = ROOT / "bench" / "results"


# --------------------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------------------


@dataclass
class Record:
    """One request as a client saw it (``time.monotonic()`` seconds)."""

    start: float
    end: float
    status: str  # "200", "500", "503", ..., "hang", "error"


class Clients:
    """*n* threads looping ``GET url+path``, a fresh connection per request, each bounded
    by *timeout*; every request recorded. Pause and resume between requests."""

    def __init__(
        self, url: str, n: int, path: str, timeout: float, max_requests: int
    ) -> None:  # fmt: skip
        check_loopback(url)
        self.url = url
        self.path = path
        self.timeout = timeout
        self.max_requests = max_requests
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self._go = threading.Event()
        self._stop = threading.Event()
        self._in_flight = 0
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(n)]

    def start(self) -> None:
        self._go.set()
        for thread in self._threads:
            thread.start()

    def _loop(self) -> None:
        sent = 0
        while sent < self.max_requests:
            self._go.wait()
            with self._lock:
                if self._stop.is_set():
                    return
                if not self._go.is_set():  # paused meanwhile
                    continue
                self._in_flight += 1
            sent += 1
            t0 = time.monotonic()
            try:
                status, _headers, _body = servers.http_get(self.url + self.path, self.timeout)
                outcome = str(status)
            except TimeoutError:
                outcome = "hang"
            except (OSError, ValueError):
                outcome = "error"
            record = Record(t0, time.monotonic(), outcome)
            with self._lock:
                self.records.append(record)
                self._in_flight -= 1
            if outcome == "error":
                time.sleep(0.05)  # the server refused or reset: do not spin

    def pause(self) -> None:
        """Stop sending; return once no request is in flight (bounded)."""
        with self._lock:  # no request starts after this
            self._go.clear()
        deadline = time.monotonic() + self.timeout + 10
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.01)

    def resume(self) -> None:
        self._go.set()

    def stop(self) -> None:
        with self._lock:
            self._stop.set()
        self._go.set()
        for thread in self._threads:
            thread.join(self.timeout + 10)


# --------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------


@dataclass
class Setting:
    """The knobs of one run."""

    warmup: float
    recovery: float
    drop: float
    freeze: float
    clients: int
    client_timeout: float
    max_requests: int


@dataclass
class Outcome:
    """What one fault did, for the report."""

    fault: str
    started: float
    ended: float
    note: str = ""
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)


FaultFn = Callable[[FaultServer, dict[str, Clients], list[str], Setting], str]


def _idle_kill(server: FaultServer, clients: dict[str, Clients], names: list[str],
               s: Setting) -> str:  # fmt: skip
    for c in clients.values():
        c.pause()
    time.sleep(0.5)  # every connection back in its pool
    killed = server.terminate(names, "idle")
    for c in clients.values():
        c.resume()
    return f"{killed} idle backends terminated"


def _busy_kill(server: FaultServer, clients: dict[str, Clients], names: list[str],
               s: Setting) -> str:  # fmt: skip
    killed = server.terminate(names, "active")
    return f"{killed} busy backends terminated"


def _restart(mode: str) -> FaultFn:
    def fault(server: FaultServer, clients: dict[str, Clients], names: list[str],
              s: Setting) -> str:  # fmt: skip
        t0 = time.monotonic()
        server.restart("fast" if mode == "fast" else "immediate")
        return f"pg_ctl restart -m {mode} took {time.monotonic() - t0:.1f}s"

    return fault


def _drop(server: FaultServer, clients: dict[str, Clients], names: list[str],
          s: Setting) -> str:  # fmt: skip
    if server.path is None:
        raise FaultSetupError("the drop needs the network-namespace server (run as root)")
    with server.path.dropping():
        time.sleep(s.drop)
    return f"path dropped silently for {s.drop:g}s"


def _freeze(server: FaultServer, clients: dict[str, Clients], names: list[str],
            s: Setting) -> str:  # fmt: skip
    with server.frozen():
        n = len(server.server_pids())
        time.sleep(s.freeze)
    return f"{n} PostgreSQL processes stopped for {s.freeze:g}s"


FAULT_FNS: dict[str, FaultFn] = {
    "idle_kill": _idle_kill,
    "busy_kill": _busy_kill,
    "restart_fast": _restart("fast"),
    "restart_immediate": _restart("immediate"),
    "drop": _drop,
    "freeze": _freeze,
}


def _pool_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """psycopg_pool's ``get_stats()`` from either app's ``/stats``."""
    if "pools" in stats:
        return dict(stats["pools"]["default"].get("pool", {}))
    return dict(stats.get("pool", {}))


@contextlib.contextmanager
def _apps(server: FaultServer, variants: list[str], log_dir: Path) -> Iterator[dict[str, str]]:
    """One gunicorn gthread per variant, each with its pool full; yield {variant: url}."""
    with contextlib.ExitStack() as stack:
        urls: dict[str, str] = {}
        for v in variants:
            proc = servers.gunicorn(
                APP, worker_class="gthread", workers=1, threads=8, log_dir=log_dir,
                env={"FAULT_VARIANT": "reqconn" if v == "hold" else v, "FAULT_DSN": server.dsn,
                     "FAULT_APPNAME": f"fault_{v}",
                     **({"FAULT_MAX_HOLD": "3"} if v == "hold" else {})},
            )  # fmt: skip
            stack.callback(proc.stop)
            urls[v] = proc.url
        for url in urls.values():

            def full(url: str = url) -> bool:
                if servers.http_get(url + "/select1", timeout=10)[0] != 200:
                    return False
                stats = json.loads(servers.http_get(url + "/stats", timeout=10)[2])
                return bool(_pool_stats(stats).get("pool_available", 0) >= 4)

            pg.wait_until(full, timeout=60, interval=0.2, message=f"{url}: pool of 4 ready")
        yield urls


def run_fault(
    fault: str, server: FaultServer, variants: list[str], s: Setting, log_dir: Path
) -> Outcome:
    path = "/sleep?s=0.5" if fault == "busy_kill" else "/select1"
    names = [f"fault_{v}" for v in variants]
    with _apps(server, variants, log_dir) as urls:
        clients = {
            v: Clients(urls[v], s.clients, path, s.client_timeout, s.max_requests)
            for v in variants
        }
        for c in clients.values():
            c.start()
        try:
            time.sleep(s.warmup)
            if fault == "busy_kill":
                with server.admin() as admin:
                    def running() -> bool:  # at least 2 queries running in every app
                        return all(
                            sum(s["state"] == "active" for s in pg.app_sessions(admin, n)) >= 2
                            for n in names
                        )

                    pg.wait_until(running, timeout=30, interval=0.01, message="queries running")
            started = time.monotonic()
            note = FAULT_FNS[fault](server, clients, names, s)
            ended = time.monotonic()
            time.sleep(s.recovery)
        finally:
            for c in clients.values():
                c.stop()
    outcome = Outcome(fault, started, ended, note)
    for v in variants:
        outcome.variants[v] = summarize(clients[v].records, started, ended, s.client_timeout)
    return outcome


def summarize(
    records: list[Record], started: float, ended: float, client_timeout: float
) -> dict[str, Any]:
    """The figures of one variant for one fault (see the module docstring)."""
    seen = [r for r in records if r.end >= started]
    statuses = Counter(r.status for r in seen)
    first_ok = min((r.end for r in seen if r.status == "200" and r.end >= ended), default=None)
    after = [r for r in seen if first_ok is not None and r.start >= first_ok]
    return {
        "requests": len(seen),
        "statuses": dict(sorted(statuses.items())),
        "hangs": statuses.get("hang", 0),
        "longest_s": round(max((r.end - r.start for r in seen), default=0.0), 3),
        "first_200_after_s": None if first_ok is None else round(max(0.0, first_ok - ended), 3),
        "errors_after_recovery": sum(1 for r in after if r.status != "200"),
        "client_timeout_s": client_timeout,
    }


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def table(outcomes: list[Outcome]) -> str:
    head = (
        f"{'fault':<18} {'variant':<25} {'reqs':>6}  {'statuses':<30} {'hangs':>5} "
        f"{'longest':>8} {'1st 200':>8} {'err after':>9}"
    )
    lines = [head, "-" * len(head)]
    for o in outcomes:
        for v, d in o.variants.items():
            statuses = " ".join(f"{k}:{n}" for k, n in d["statuses"].items())
            first = d["first_200_after_s"]
            lines.append(
                f"{o.fault:<18} {VARIANT_TITLES[v]:<25} {d['requests']:>6}  {statuses:<30} "
                f"{d['hangs']:>5} {d['longest_s']:>7.2f}s "
                f"{'never' if first is None else f'{first:.2f}s':>8} "
                f"{d['errors_after_recovery']:>9}"
            )
        lines.append(f"{'':<18} ({o.note})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short faults and windows")
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated subset")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--drop", type=float, help="seconds of silent drop (40; quick 8)")
    parser.add_argument("--freeze", type=float, help="seconds frozen (20; quick 5)")
    parser.add_argument("--recovery", type=float, help="load after the fault (30; quick 15)")
    parser.add_argument("--warmup", type=float, help="load before the fault (3; quick 2)")
    parser.add_argument("--clients", type=int, default=6, help="client threads per variant")
    parser.add_argument("--client-timeout", type=float, default=30.0)
    parser.add_argument("--max-requests", type=int, default=50_000, help="per client thread")
    parser.add_argument("--no-drop", action="store_true", help="skip the drop (no root needed)")
    parser.add_argument("--out", type=Path, default=RESULTS / "faults")
    args = parser.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    variants = [v for v in args.variants.split(",") if v]
    if bad := [f for f in faults if f not in FAULTS] + [v for v in variants if v not in VARIANTS]:
        parser.error(f"unknown: {', '.join(bad)}")
    if args.no_drop:
        faults = [f for f in faults if f != "drop"]
    if not 1 <= args.clients <= 32 or not 1 <= args.client_timeout <= 300:
        parser.error("--clients must be 1..32 and --client-timeout 1..300 s")
    q = args.quick
    s = Setting(
        warmup=args.warmup if args.warmup is not None else (2 if q else 3),
        recovery=args.recovery if args.recovery is not None else (15 if q else 30),
        drop=args.drop if args.drop is not None else (8 if q else 40),
        freeze=args.freeze if args.freeze is not None else (5 if q else 20),
        clients=args.clients,
        client_timeout=args.client_timeout,
        max_requests=args.max_requests,
    )
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="reqconn-faults-bench-") as tmp:
        try:
            with fault_server(netns="drop" in faults) as server:
                for fault in faults:
                    print(f"[faults] {fault} ...", flush=True)
                    outcome = run_fault(fault, server, variants, s, Path(tmp))
                    outcomes.append(outcome)
                    print(table([outcome]), flush=True)
        except FaultSetupError as exc:
            print(f"[faults] {exc}", file=sys.stderr)
            return 1
    text = (
        f"bench/faults.py {'--quick ' if q else ''}({time.strftime('%Y-%m-%d %H:%M')}): "
        f"{s.clients} clients per variant, client timeout {s.client_timeout:g}s, warm-up "
        f"{s.warmup:g}s, recovery window {s.recovery:g}s, drop {s.drop:g}s, freeze "
        f"{s.freeze:g}s; gunicorn gthread 1x8, pool 4, checkout timeout 2s\n\n"
        + table(outcomes)
        + "\n"
    )
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".txt").write_text(text)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "setting": s.__dict__,
                "quick": q,
                "faults": [
                    {"fault": o.fault, "note": o.note, "duration_s": round(o.ended - o.started, 3),
                     "variants": o.variants}
                    for o in outcomes
                ],
            },
            indent=2,
        )
        + "\n"
    )  # fmt: skip
    print(f"[faults] wrote {args.out.with_suffix('.txt')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
