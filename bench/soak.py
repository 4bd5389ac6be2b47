"""Weeks of traffic in minutes: does anything grow?

    .venv/bin/python bench/soak.py                    # 200 000 requests
    .venv/bin/python bench/soak.py --requests 20000   # shorter

One gunicorn gthread worker (8 threads) serves ``tests/apps/faultapp.py`` (flask-reqconn,
pool of 4) from a PostgreSQL of its own (``tests/fix_faults.py``). Client threads send a
mix of requests as fast as they are answered:

``select``       ``GET /select1``, read to the end
``stream``       ``GET /stream?n=3``, read to the end
``abort``        ``GET /sleep?s=0.05`` and close at once (FIN or RST)
``stream_drop``  ``GET /stream?n=50``, read the first bytes, close (FIN or RST)
``cancel``       ``GET /sleep?s=5``, close after 50-150 ms (the watcher cancels the query)

Every ``--terminate-every`` requests all backends of the app are terminated
(``pg_terminate_backend``) under traffic, and once, half-way, the server is restarted
(``pg_ctl -m fast``). At ``--samples`` points the clients pause, the worker goes quiet
(nothing checked out, the pool full again), and its RSS, open fds and threads (from /proc)
and the pool counters (``/stats``) are recorded. The verdict compares the last sample with
the first one after warm-up: RSS growth under ``--max-rss-mb`` (5), fds and threads within
``--slack`` (0) of the baseline, the worker process unchanged, nothing checked out.

A 500 is counted by operation; ``--no-500`` makes any 500 a failure (the suite's short
soak uses it): since the library discards dead connections and answers 503 for a lost
database, a lost connection is never a 500.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
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
APPNAME = "fault_soak"
RESULTS = ROOT / "bench" / "results"

#: The traffic mix: operation -> weight.
MIX: dict[str, int] = {"select": 85, "stream": 3, "abort": 5, "stream_drop": 4, "cancel": 3}


@dataclass
class SoakConfig:
    """The knobs of one soak."""

    requests: int = 200_000
    clients: int = 6
    samples: int = 10
    terminate_every: int = 20_000
    restart: bool = True
    max_rss_mb: float = 5.0
    slack: int = 0
    no_500: bool = False
    client_timeout: float = 30.0
    seed: int = 11


@dataclass
class Sample:
    """The worker at one quiet moment."""

    requests: int
    elapsed_s: float
    rss_kb: int
    fds: int
    threads: int
    checked_out: int
    checkouts: int
    cancelled: int
    client_gone: int
    pool: dict[str, Any] = field(default_factory=dict)


def proc_figures(pid: int) -> tuple[int, int, int]:
    """(VmRSS in kB, open fds, threads) of *pid*, from /proc."""
    rss = threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss, len(list(Path(f"/proc/{pid}/fd").iterdir())), threads


class Traffic:
    """Client threads sending :data:`MIX` until *total* operations are done."""

    def __init__(self, url: str, cfg: SoakConfig) -> None:
        check_loopback(url)
        self.url = url
        self.cfg = cfg
        self.done = 0
        self.outcomes: Counter[str] = Counter()  # "select:200", "cancel:sent", ...
        self._lock = threading.Lock()
        self._go = threading.Event()
        self._in_flight = 0
        ops, weights = zip(*MIX.items(), strict=True)
        self._ops: tuple[str, ...] = ops
        self._weights: tuple[int, ...] = weights
        self._threads = [
            threading.Thread(target=self._loop, args=(cfg.seed + i,), daemon=True)
            for i in range(cfg.clients)
        ]

    def start(self) -> None:
        self._go.set()
        for thread in self._threads:
            thread.start()

    def _loop(self, seed: int) -> None:
        rnd = random.Random(seed)
        while True:
            self._go.wait()
            with self._lock:
                if self.done >= self.cfg.requests:
                    return
                if not self._go.is_set():
                    continue
                self.done += 1
                self._in_flight += 1
            op = rnd.choices(self._ops, self._weights)[0]
            try:
                outcome = self._one(op, rnd)
            except TimeoutError:
                outcome = "hang"
            except (OSError, ValueError):
                outcome = "error"
            with self._lock:
                self.outcomes[f"{op}:{outcome}"] += 1
                self._in_flight -= 1

    def _one(self, op: str, rnd: random.Random) -> str:
        how = rnd.choice(("close", "rst"))
        timeout = self.cfg.client_timeout
        if op == "select":
            return str(servers.http_get(self.url + "/select1", timeout)[0])
        if op == "stream":
            return str(servers.http_get(self.url + "/stream?n=3", timeout)[0])
        if op == "abort":
            servers.send_and_close(self.url, "/sleep?s=0.05", how=how)
            return "sent"
        if op == "stream_drop":
            status, _ = servers.read_first_chunk_and_drop(
                self.url, "/stream?n=50", how=how, timeout=timeout
            )
            return f"dropped-{status}"
        sock = servers.raw_connect(self.url)
        try:
            sock.sendall(b"GET /sleep?s=5 HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
            time.sleep(rnd.uniform(0.05, 0.15))
        finally:
            sock.close()
        return "sent"

    def pause(self) -> None:
        with self._lock:  # no operation starts after this
            self._go.clear()
        deadline = time.monotonic() + self.cfg.client_timeout + 10
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.01)

    def resume(self) -> None:
        self._go.set()

    def finished(self) -> bool:
        return self.done >= self.cfg.requests

    def join(self) -> None:
        self._go.set()
        for thread in self._threads:
            thread.join(self.cfg.client_timeout + 10)


def _stats(url: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(servers.http_get(url + "/stats", timeout=10)[2])
    return data


def _quiet_sample(url: str, pid: int, done: int, t0: float) -> Sample:
    """Wait until nothing is checked out and the pool is full, then sample."""

    def quiet() -> dict[str, Any] | None:
        stats = _stats(url)
        pool = stats["pools"]["default"].get("pool", {})
        ok = stats["checked_out"] == 0 and pool.get("pool_available", 0) >= 4
        return stats if ok else None

    stats = pg.wait_until(quiet, timeout=60, interval=0.1, message="worker quiet, pool full")
    assert stats is not None
    before = proc_figures(pid)
    while True:  # a socket of a request that just ended may still be closing
        time.sleep(0.3)
        now = proc_figures(pid)
        if now[1:] == before[1:]:
            break
        before = now
    pool = stats["pools"]["default"].get("pool", {})
    return Sample(
        requests=done, elapsed_s=round(time.monotonic() - t0, 1), rss_kb=now[0], fds=now[1],
        threads=now[2], checked_out=stats["checked_out"], checkouts=stats["checkouts"],
        cancelled=stats["cancelled"], client_gone=stats["client_gone"],
        pool={k: v for k, v in pool.items() if not k.startswith("requests_wait")},
    )  # fmt: skip


def run_soak(server: FaultServer, cfg: SoakConfig, log_dir: Path) -> dict[str, Any]:
    """Run one soak against *server*; return samples, outcomes and the verdict."""
    proc = servers.gunicorn(
        APP, worker_class="gthread", workers=1, threads=8, log_dir=log_dir,
        env={"FAULT_VARIANT": "reqconn", "FAULT_DSN": server.dsn, "FAULT_APPNAME": APPNAME},
    )  # fmt: skip
    samples: list[Sample] = []
    events: list[str] = []
    try:
        (worker,) = proc.worker_pids()
        traffic = Traffic(proc.url, cfg)
        t0 = time.monotonic()
        sample_every = max(1, cfg.requests // cfg.samples)
        next_sample, next_kill = sample_every, cfg.terminate_every
        restart_at = cfg.requests // 2 if cfg.restart else None
        servers.http_get(proc.url + "/select1", 10)  # the pool opens on first use
        samples.append(_quiet_sample(proc.url, worker, 0, t0))
        traffic.start()
        while not traffic.finished():
            time.sleep(0.01)
            done = traffic.done
            if cfg.terminate_every and done >= next_kill:
                n = server.terminate(APPNAME, "any")
                events.append(f"{done}: {n} backends terminated")
                next_kill += cfg.terminate_every
            if restart_at is not None and done >= restart_at:
                server.restart("fast")
                events.append(f"{done}: restarted (fast)")
                restart_at = None
            if done >= next_sample:
                traffic.pause()
                samples.append(_quiet_sample(proc.url, worker, traffic.done, t0))
                next_sample += sample_every
                traffic.resume()
        traffic.join()
        samples.append(_quiet_sample(proc.url, worker, traffic.done, t0))
        elapsed = time.monotonic() - t0
        worker_now = proc.worker_pids()
    finally:
        proc.stop()
    return {
        "config": cfg.__dict__,
        "elapsed_s": round(elapsed, 1),
        "samples": [s.__dict__ for s in samples],
        "outcomes": dict(sorted(traffic.outcomes.items())),
        "events": events,
        "verdict": verdict(samples, traffic.outcomes, cfg, worker, worker_now),
    }


def verdict(
    samples: list[Sample], outcomes: Counter[str], cfg: SoakConfig, worker: int,
    worker_now: list[int],
) -> dict[str, Any]:  # fmt: skip
    """Growth between the first sample after warm-up and the last; problems listed."""
    base = samples[1] if len(samples) > 2 else samples[0]
    last = samples[-1]
    problems: list[str] = []
    rss_growth_mb = (last.rss_kb - base.rss_kb) / 1024
    if rss_growth_mb >= cfg.max_rss_mb:
        problems.append(f"RSS grew {rss_growth_mb:.1f} MB (limit {cfg.max_rss_mb:g})")
    if last.fds > base.fds + cfg.slack:
        problems.append(f"open fds {base.fds} -> {last.fds}")
    if last.threads > base.threads + cfg.slack:
        problems.append(f"threads {base.threads} -> {last.threads}")
    if last.checked_out:
        problems.append(f"{last.checked_out} still checked out")
    if worker_now != [worker]:
        problems.append(f"the worker changed: {worker} -> {worker_now}")
    hangs = sum(n for k, n in outcomes.items() if k.endswith(":hang"))
    if hangs:
        problems.append(f"{hangs} requests got no answer within {cfg.client_timeout:g}s")
    n500 = sum(n for k, n in outcomes.items() if k.endswith(":500"))
    if cfg.no_500 and n500:
        problems.append(f"{n500} answers were 500")
    return {
        "ok": not problems,
        "problems": problems,
        "rss_growth_mb": round(rss_growth_mb, 2),
        "fds": [base.fds, last.fds],
        "threads": [base.threads, last.threads],
        "http_500": n500,
        "hangs": hangs,
    }


def report(result: dict[str, Any]) -> str:
    cfg, v = result["config"], result["verdict"]
    lines = [
        f"bench/soak.py: {cfg['requests']} requests, {cfg['clients']} clients, backends "
        f"terminated every {cfg['terminate_every']} requests, restart: {cfg['restart']}; "
        f"{result['elapsed_s']}s",
        "",
        f"{'requests':>9} {'time':>7} {'RSS MB':>7} {'fds':>4} {'threads':>7} {'checkouts':>9} "
        f"{'conns made':>10} {'lost':>4} {'bad returns':>11}",
    ]
    for s in result["samples"]:
        pool = s["pool"]
        lines.append(
            f"{s['requests']:>9} {s['elapsed_s']:>6.0f}s {s['rss_kb'] / 1024:>7.1f} "
            f"{s['fds']:>4} {s['threads']:>7} {s['checkouts']:>9} "
            f"{pool.get('connections_num', 0):>10} {pool.get('connections_lost', 0):>4} "
            f"{pool.get('returns_bad', 0):>11}"
        )
    lines += ["", "outcomes: " + ", ".join(f"{k} {n}" for k, n in result["outcomes"].items())]
    lines += ["events: " + "; ".join(result["events"])]
    lines += [
        f"verdict: {'OK' if v['ok'] else 'FAILED'}: RSS growth {v['rss_growth_mb']} MB, fds "
        f"{v['fds'][0]} -> {v['fds'][1]}, threads {v['threads'][0]} -> {v['threads'][1]}, "
        f"{v['http_500']} HTTP 500, {v['hangs']} hangs"
    ]
    lines += [f"  problem: {p}" for p in v["problems"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    d = SoakConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=d.requests)
    parser.add_argument("--clients", type=int, default=d.clients)
    parser.add_argument("--samples", type=int, default=d.samples)
    parser.add_argument("--terminate-every", type=int, default=None,
                        help="requests between terminations (default requests/10; 0: never)")
    parser.add_argument("--no-restart", action="store_true")
    parser.add_argument("--max-rss-mb", type=float, default=d.max_rss_mb)
    parser.add_argument("--slack", type=int, default=d.slack, help="fds/threads allowed extra")
    parser.add_argument("--no-500", action="store_true", help="fail on any HTTP 500")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak")
    args = parser.parse_args(argv)  # fmt: skip
    if not 100 <= args.requests <= 10_000_000 or not 1 <= args.clients <= 32:
        parser.error("--requests must be 100..10M and --clients 1..32")
    cfg = SoakConfig(
        requests=args.requests, clients=args.clients, samples=max(2, args.samples),
        terminate_every=(args.requests // 10 if args.terminate_every is None
                         else args.terminate_every),
        restart=not args.no_restart, max_rss_mb=args.max_rss_mb, slack=args.slack,
        no_500=args.no_500,
    )  # fmt: skip
    try:
        with tempfile.TemporaryDirectory(prefix="reqconn-soak-") as tmp:
            with fault_server() as server:
                result = run_soak(server, cfg, Path(tmp))
    except FaultSetupError as exc:
        print(f"[soak] {exc}", file=sys.stderr)
        return 1
    text = report(result)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".txt").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["verdict"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
