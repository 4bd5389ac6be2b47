#!/usr/bin/env python3
"""flask-reqconn against the code users would write by hand: the whole benchmark.

    python3 bench/run.py            # full run, about 10 minutes
    python3 bench/run.py --quick    # the same steps, short, about 3 minutes

Needs nothing but Python 3.10+ to start: it makes sure the project's ``.venv`` exists
(``scripts/dev.py``'s recipe), installs ``bench/requirements.txt`` into it if missing
(Flask-SQLAlchemy, SQLAlchemy), and re-runs itself with that venv's Python. wrk is used
for the load if it is installed (``apt-get install -y wrk``); otherwise a Python load
client, whose figures are much lower.

Steps, all against one throwaway PostgreSQL (:mod:`flask_reqconn.testing`;
``$REQCONN_TEST_DSN`` to use another) with a seeded, indexed table:

1. micro: the in-process per-request path, hook timers and a profile (``micro.py``);
2. http: real gunicorn (gthread, then sync) serving every variant of ``benchapp.py`` on
   its own port, each variant with the same pool size; load from a separate process,
   variants interleaved over several rounds (the order rotates every round);
3. storm: 64 clients of normal load, with and without 1000 aborted requests at the same
   time; then leak checks through ``/stats`` of every worker and ``pg_stat_activity``;
4. stall: 8 clients of normal load on ``/read``, calm and while clients that stall
   (``stallload.py``: slow and stalled uploads, more of them than the pool has
   connections) attack an upload, against bare psycopg_pool (the body read inside and
   before ``with pool.connection()``) and flask-reqconn's eager checkout.

Results go to ``bench/results/`` (``latest.json``, ``latest.txt``, ``latest.rst`` and the
cProfile dumps).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV = ROOT / ".venv"


# --------------------------------------------------------------------------------------
# Bootstrap: the project venv and the bench requirements
# --------------------------------------------------------------------------------------


def _in_project_venv() -> bool:
    """This checkout's ``.venv``, or another virtualenv that has the project (the main
    checkout's, used from a worktree: the servers put the current directory first on
    their ``PYTHONPATH``, so run from the worktree)."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return True
    import importlib.util

    return sys.prefix != sys.base_prefix and importlib.util.find_spec("flask_reqconn") is not None


def bootstrap() -> None:
    if not _in_project_venv():
        import importlib.util

        # scripts/dev.py: creates .venv, installs the project with [dev]
        spec = importlib.util.spec_from_file_location("dev", ROOT / "scripts" / "dev.py")
        assert spec is not None and spec.loader is not None
        dev = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(dev)
        dev.ensure_venv()
        python = str(VENV / "bin" / "python")
        # the script that called (sqla.py, compare.py...), not always this one
        os.execv(python, [python, str(Path(sys.argv[0]).resolve()), *sys.argv[1:]])
    try:
        import flask_sqlalchemy  # noqa: F401
        import sqlalchemy  # noqa: F401
    except ImportError:
        print("[bench] installing bench/requirements.txt into .venv", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "-r", str(BENCH / "requirements.txt")],
            check=True,
        )


# --------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------

DB_VARIANTS = ["bare", "eager", "eager-noreset", "lazy", "fsqla"]
NODB_VARIANTS = ["plain", "bare", "eager", "lazy", "fsqla"]
ENDPOINTS = {"select1": DB_VARIANTS, "read": DB_VARIANTS, "nodb": NODB_VARIANTS}
#: What each safety feature costs on /select1: one switched off at a time, then all; and
#: ``floor-all``, every guarantee at its least (``benchapp``): the throughput of the floor.
ABLATION = {
    "select1": [
        "bare", "eager", "eager-noreset", "eager-nocheck", "eager-nocancel", "eager-leak",
        "eager-noreset-nocheck-nocancel", "floor-all",
    ],
    "read": ["bare", "eager", "floor-all"],
}  # fmt: skip
LABELS = {
    "bare": "(a) bare psycopg_pool",
    "eager": "(b) reqconn eager",
    "lazy": "(c) reqconn lazy",
    "fsqla": "(d) Flask-SQLAlchemy",
    "plain": "(e) plain Flask",
    "fsqlarc": "(f) Flask-SQLAlchemy on reqconn",
    "floor": "floor: the shape and a connection",
}
SWITCH_LABELS = {
    "noreset": "RESET_SESSION=False",
    "nocheck": "CHECK_CLIENT=False",
    "nocancel": "CANCEL_ON_DISCONNECT=off",
    "noprep": "no prepared statements",
    "leak": "LEAK_THRESHOLD=30 (leak detection on)",
}


#: ``fsqla``'s switches (``benchapp.FSQLA_SWITCHES``): the engine options real apps set
FSQLA_SWITCH_LABELS = {"preping": "pool_pre_ping", "recycle": "pool_recycle"}


def label(variant: str) -> str:
    base, *switches = variant.split("-")
    if not switches:
        return LABELS[base]
    if variant == "floor-all":
        return "floor-all: every guarantee at its least"
    if base == "fsqla":
        return f"{LABELS[base]}, " + ", ".join(FSQLA_SWITCH_LABELS[s] for s in switches)
    if len(switches) == len(SWITCH_LABELS):
        return f"{LABELS[base]}, all four off"
    return f"{LABELS[base]}, " + ", ".join(SWITCH_LABELS[s] for s in switches)


# worker class -> (workers, threads, load connections). One gthread worker: with two, wrk's
# keep-alive connections split unevenly between them, and each cell came out in one of two
# modes (CPU per request 290 or 455 µs for the same plain Flask app) depending on the split.
# sync workers take one connection at a time and balance by themselves.
SERVERS = {"gthread": (1, 4, 8), "sync": (4, 1, 8)}


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------


def machine_info(dsn: str, wrk: str | None) -> dict[str, Any]:
    import importlib.metadata as md

    import psycopg

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in (
        "flask-reqconn", "flask", "werkzeug", "gunicorn", "psycopg", "psycopg-binary",
        "psycopg-pool", "flask-sqlalchemy", "sqlalchemy",
    ):  # fmt: skip
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        pg_version = row[0] if row else "?"
    wrk_version = None
    if wrk:
        out = subprocess.run([wrk, "-v"], capture_output=True, text=True)
        wrk_version = (out.stdout or out.stderr).splitlines()[0].strip()
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "flask_reqconn"], cwd=ROOT, capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": pg_version,
        "load_tool": wrk_version or "python client (loadgen.py)",
        "versions": versions,
        "git": git + ("+local changes" if dirty else ""),
        "loadavg_start": os.getloadavg(),
    }


# --------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------


def start_server(variant: str, worker_class: str, dsn: str, pool_size: int, rows: int,
                 log_dir: Path, threads: int | None = None) -> Any:
    from flask_reqconn.testing import gunicorn

    workers, default_threads, _conns = SERVERS[worker_class]
    threads = threads or default_threads
    return gunicorn(
        "benchapp:create_app()",
        worker_class=worker_class,
        workers=workers,
        threads=threads,
        extra_args=["--pythonpath", str(BENCH), "--log-level", "warning"],
        env={
            "BENCH_VARIANT": variant,
            "BENCH_DSN": dsn,
            "BENCH_POOL_SIZE": str(pool_size),
            "BENCH_ROWS": str(rows),
        },
        log_dir=log_dir,
    )


@contextlib.contextmanager
def running(variants: Sequence[str], worker_class: str, dsn: str, pool_size: int, rows: int,
            log_dir: Path, threads: int | None = None) -> Iterator[dict[str, Any]]:
    started: dict[str, Any] = {}
    try:
        for variant in variants:
            started[variant] = start_server(
                variant, worker_class, dsn, pool_size, rows, log_dir, threads
            )
        yield started
    finally:
        for server in started.values():
            try:
                server.stop()
            except Exception as exc:  # report, keep stopping the others
                say(f"stopping {server!r}: {exc}")


def get(url: str, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    from flask_reqconn.testing import http_get

    status, _headers, body = http_get(url + path, timeout=timeout)
    return status, body


def warm(server: Any, paths: Sequence[str], n: int = 40) -> None:
    for path in paths:
        for _ in range(n):
            status, body = get(server.url, path)
            if status != 200:
                raise RuntimeError(f"{server!r} {path}: {status} {body[:200]!r}")


def worker_stats(server: Any, attempts: int = 80) -> dict[int, dict[str, Any]]:
    """``/stats`` of every worker of *server*, by pid (new connection per request)."""
    want = set(server.worker_pids())
    seen: dict[int, dict[str, Any]] = {}
    for _ in range(attempts):
        status, body = get(server.url, "/stats")
        if status != 200:
            raise RuntimeError(f"/stats answered {status}")
        data = json.loads(body)
        seen[data["pid"]] = data
        if want <= set(seen):
            break
    return seen


# --------------------------------------------------------------------------------------
# Step 2: the HTTP matrix
# --------------------------------------------------------------------------------------

def process_cpu(pids: Sequence[int]) -> float:
    """CPU seconds (user + system, all threads) used so far by *pids*."""
    from flask_reqconn.testing import cpu_seconds

    return cpu_seconds(pids)


def backend_pids(admin_dsn: str, variant: str, appname: str | None = None) -> list[int]:
    """PostgreSQL backends of *variant*'s pool connections (by application_name)."""
    import psycopg

    from flask_reqconn.testing import read_stat

    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
            (appname or "bench_" + variant.replace("-", "_"),),
        ).fetchall()
    pids = [row[0] for row in rows]
    # A server elsewhere (REQCONN_TEST_DSN) has no /proc entries here: no DB CPU then.
    return [pid for pid in pids if read_stat(pid) is not None]


def measured_load(server: Any, pids: tuple[list[int], list[int]], url: str, *,
                  connections: int, duration: float, force_python: bool) -> dict[str, Any]:
    """Load *url* and add the CPU its server (app workers, DB backends) spent per request."""
    from loadgen import run_load

    app_pids, db_pids = pids
    app0, db0 = process_cpu(app_pids), process_cpu(db_pids)
    res = run_load(url, connections=connections, duration=duration, force_python=force_python)
    app1, db1 = process_cpu(app_pids), process_cpu(db_pids)
    n = max(1, res["requests"])
    res["app_cpu_us"] = (app1 - app0) / n * 1e6
    res["db_cpu_us"] = (db1 - db0) / n * 1e6 if db_pids else None
    return res


def http_matrix(dsn: str, admin_dsn: str, *, worker_class: str, rounds: int, duration: float,
                pool_size: int, rows: int, log_dir: Path, force_python: bool,
                plan: dict[str, list[str]] | None = None) -> dict[str, Any]:
    from loadgen import run_load

    plan = plan or ENDPOINTS
    connections = SERVERS[worker_class][2]
    cells: dict[str, dict[str, list[dict[str, Any]]]] = {
        ep: {v: [] for v in variants} for ep, variants in plan.items()
    }
    variants_needed = list(dict.fromkeys(v for vs in plan.values() for v in vs))
    say(f"{worker_class}: starting {len(variants_needed)} gunicorn servers")
    with running(variants_needed, worker_class, dsn, pool_size, rows, log_dir) as srv:
        for variant, server in srv.items():
            paths = ["/nodb"] if variant == "plain" else ["/select1", "/read", "/nodb"]
            warm(server, paths)
        say(f"{worker_class}: warm-up round (discarded)")
        for ep, variants in plan.items():
            for variant in variants:
                run_load(f"{srv[variant].url}/{ep}", connections=connections, duration=1,
                         force_python=force_python)
        pids = {
            v: (s.worker_pids(), [] if v == "plain" else backend_pids(admin_dsn, v))
            for v, s in srv.items()
        }
        for r in range(rounds):
            for ep, variants in plan.items():
                shift = r % len(variants)
                order = variants[shift:] + variants[:shift]
                if r % 2:
                    order = order[::-1]
                line = []
                for variant in order:
                    res = measured_load(
                        srv[variant], pids[variant], f"{srv[variant].url}/{ep}",
                        connections=connections, duration=duration, force_python=force_python,
                    )
                    res["round"] = r
                    res["loadavg"] = os.getloadavg()[0]
                    cells[ep][variant].append(res)
                    bad = res["errors"] + res["non2xx"]
                    line.append(
                        f"{variant} {res['rps']:.0f}/s {_cpu(res):.0f}µs"
                        + (f" ({bad} bad)" if bad else "")
                    )
                say(f"{worker_class} round {r + 1}/{rounds} /{ep}: " + ", ".join(line))
        logs = {v: s.log_text()[-4000:] for v, s in srv.items()}
    return {
        "worker_class": worker_class,
        "workers": SERVERS[worker_class][0],
        "threads": SERVERS[worker_class][1],
        "connections": connections,
        "duration": duration,
        "rounds": rounds,
        "cells": cells,
        "summary": summarize(cells),
        "log_problems": {
            v: text.count("Traceback") for v, text in logs.items() if "Traceback" in text
        },
    }


def _cpu(run: dict[str, Any]) -> float:
    """Server CPU µs per request: app workers plus their DB backends."""
    return float(run.get("app_cpu_us", 0.0)) + float(run.get("db_cpu_us") or 0.0)


def summarize(cells: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for ep, by_variant in cells.items():
        rows: dict[str, Any] = {}
        rounds = min(len(runs) for runs in by_variant.values())
        for variant, runs in by_variant.items():
            rps = [run["rps"] for run in runs]
            cpu = [_cpu(run) for run in runs]
            row = {
                "cpu_us_median": statistics.median(cpu),
                "app_cpu_us_median": statistics.median(run["app_cpu_us"] for run in runs),
                "rps_median": statistics.median(rps),
                "rps_min": min(rps),
                "rps_max": max(rps),
                "p50_ms": statistics.median(run["p50_ms"] for run in runs),
                "p99_ms": statistics.median(run["p99_ms"] for run in runs),
                "bad": sum(run["errors"] + run["non2xx"] for run in runs),
            }
            for ref in ("bare", "plain"):
                if ref in by_variant:
                    ratios = [
                        by_variant[variant][i]["rps"] / by_variant[ref][i]["rps"]
                        for i in range(rounds)
                    ]
                    row[f"ratio_{ref}"] = statistics.median(ratios)
                    row[f"cpu_ratio_{ref}"] = statistics.median(
                        _cpu(by_variant[variant][i]) / _cpu(by_variant[ref][i])
                        for i in range(rounds)
                    )
                    row[f"ratio_{ref}_min"] = min(ratios)
                    row[f"ratio_{ref}_max"] = max(ratios)
            rows[variant] = row
        out[ep] = rows
    return out


# --------------------------------------------------------------------------------------
# Step 3: the storm under load
# --------------------------------------------------------------------------------------


def pg_sessions(admin_dsn: str, appname: str) -> dict[str, int]:
    import psycopg

    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE state <> 'idle'),"
            " count(*) FILTER (WHERE state LIKE 'idle in transaction%%')"
            " FROM pg_stat_activity WHERE application_name = %s",
            (appname,),
        ).fetchone()
    assert row is not None
    return {"total": row[0], "not_idle": row[1], "idle_in_transaction": row[2]}


def settle(server: Any, variant: str, admin_dsn: str, timeout: float = 15.0) -> dict[str, Any]:
    """Wait until nothing is checked out and no session is busy; return the readings."""
    appname = "bench_" + variant.replace("-", "_")
    deadline = time.monotonic() + timeout
    began = time.monotonic()
    while True:
        sessions = pg_sessions(admin_dsn, appname)
        checked_out = None
        if variant != "bare":
            stats = worker_stats(server)
            checked_out = sum(s["checked_out"] for s in stats.values())
        clean = sessions["not_idle"] == 0 and not checked_out
        if clean or time.monotonic() > deadline:
            return {
                "clean": clean,
                "seconds": round(time.monotonic() - began, 2),
                "checked_out": checked_out,
                "pg": sessions,
            }
        time.sleep(0.2)


def storm_under_load(dsn: str, admin_dsn: str, *, variants: Sequence[str], rounds: int,
                     duration: int, aborts: int, pool_size: int, rows: int, log_dir: Path,
                     force_python: bool) -> dict[str, Any]:
    from loadgen import run_load

    workers, threads, _ = SERVERS["gthread"]
    out: dict[str, Any] = {
        "clients": 64, "aborts": aborts, "duration": duration, "rounds": rounds,
        "workers": workers, "threads": threads, "pool_size": pool_size, "variants": {},
    }
    say(f"storm: starting gthread servers for {', '.join(variants)}")
    with running(variants, "gthread", dsn, pool_size, rows, log_dir) as srv:
        for server in srv.values():
            warm(server, ["/read", "/stream"])
        runs: dict[str, dict[str, list[Any]]] = {
            v: {"calm": [], "storm": [], "aborts": [], "settle": []} for v in variants
        }
        for r in range(rounds):
            for variant in variants if r % 2 == 0 else list(variants)[::-1]:
                server = srv[variant]
                url = f"{server.url}/read"
                phases = ("calm", "storm") if r % 2 == 0 else ("storm", "calm")
                for phase in phases:
                    if phase == "calm":
                        res = run_load(url, connections=64, duration=duration,
                                       force_python=force_python)
                    else:
                        storm_proc = subprocess.Popen(
                            [sys.executable, str(BENCH / "stormload.py"), url,
                             "--count", str(aborts), "--seconds", str(duration),
                             "--concurrency", "16"],
                            stdout=subprocess.PIPE, text=True,
                        )  # fmt: skip
                        try:
                            res = run_load(url, connections=64, duration=duration,
                                           force_python=force_python)
                        finally:
                            stdout, _ = storm_proc.communicate(timeout=duration + 90)
                        runs[variant]["aborts"].append(json.loads(stdout))
                    runs[variant][phase].append(res)
                    runs[variant]["settle"].append(settle(server, variant, admin_dsn))
                calm, storm = runs[variant]["calm"][-1], runs[variant]["storm"][-1]
                say(
                    f"storm round {r + 1}/{rounds} {variant}: calm {calm['rps']:.0f} req/s,"
                    f" storm {storm['rps']:.0f} req/s ({storm['rps'] / calm['rps']:.3f});"
                    f" aborts {runs[variant]['aborts'][-1]['outcomes']};"
                    f" settle {runs[variant]['settle'][-1]}"
                )
        for variant, data in runs.items():
            server = srv[variant]
            final = {
                "pg": pg_sessions(admin_dsn, "bench_" + variant.replace("-", "_")),
                "pg_max_expected": workers * pool_size,
            }
            if variant != "bare":
                stats = worker_stats(server)
                final["workers_seen"] = len(stats)
                final["checked_out"] = sum(s["checked_out"] for s in stats.values())
                releases: dict[str, int] = {}
                for s in stats.values():
                    for reason, n in s["releases"].items():
                        releases[reason] = releases.get(reason, 0) + n
                final["releases"] = releases
                final["checkouts"] = sum(s["checkouts"] for s in stats.values())
                final["client_gone"] = sum(s["client_gone"] for s in stats.values())
                final["exhausted"] = sum(s["exhausted"] for s in stats.values())
                final["cancelled"] = sum(s.get("cancelled", 0) for s in stats.values())
            log = server.log_text()
            final["log_tracebacks"] = log.count("Traceback")
            final["log_warnings"] = sum(
                1 for line in log.splitlines() if "WARNING" in line or "ERROR" in line
            )
            ratios = [s["rps"] / c["rps"] for c, s in zip(data["calm"], data["storm"], strict=True)]
            out["variants"][variant] = {
                "calm_rps_median": statistics.median(c["rps"] for c in data["calm"]),
                "storm_rps_median": statistics.median(s["rps"] for s in data["storm"]),
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "calm_p99_ms": statistics.median(c["p99_ms"] for c in data["calm"]),
                "storm_p99_ms": statistics.median(s["p99_ms"] for s in data["storm"]),
                "normal_bad": sum(x["errors"] + x["non2xx"] for x in data["calm"] + data["storm"]),
                "leak_free": all(s["clean"] for s in data["settle"])
                and final["pg"]["not_idle"] == 0
                and final["pg"]["total"] <= final["pg_max_expected"]
                and not final.get("checked_out"),
                "final": final,
                "runs": data,
            }
    return out


# --------------------------------------------------------------------------------------
# Step 4: clients that stall
# --------------------------------------------------------------------------------------

#: (case, variant, the upload the stalled clients attack)
STALL_CASES = [
    ("bare, body read in the block", "bare", "/upload"),
    ("bare, body read first", "bare", "/upload-first"),
    ("reqconn eager", "eager", "/upload"),
]
#: gthread threads for the stall step: room for the load and the stalled clients both,
#: so that the pool, not the threads, is what the attack can exhaust.
STALL_THREADS = 16
STALL_LOAD_CONNECTIONS = 8


def stalled_under_load(dsn: str, admin_dsn: str, *, rounds: int, duration: int, clients: int,
                       pool_size: int, rows: int, log_dir: Path,
                       force_python: bool) -> dict[str, Any]:
    """Normal load on ``/read``, calm and while *clients* stalled uploads attack, per case."""
    from loadgen import run_load

    out: dict[str, Any] = {
        "clients": clients, "duration": duration, "rounds": rounds, "workers": 1,
        "threads": STALL_THREADS, "pool_size": pool_size,
        "connections": STALL_LOAD_CONNECTIONS, "cases": {},
    }  # fmt: skip
    say(f"stall: starting gthread servers ({STALL_THREADS} threads) for bare and eager")
    with running(["bare", "eager"], "gthread", dsn, pool_size, rows, log_dir,
                 threads=STALL_THREADS) as srv:  # fmt: skip
        for server in srv.values():
            warm(server, ["/read"])
        runs: dict[str, dict[str, list[Any]]] = {
            case: {"calm": [], "stalled": [], "attack": [], "settle": []}
            for case, _v, _p in STALL_CASES
        }
        for r in range(rounds):
            for case, variant, path in STALL_CASES if r % 2 == 0 else STALL_CASES[::-1]:
                server = srv[variant]
                url = f"{server.url}/read"
                calm = run_load(url, connections=STALL_LOAD_CONNECTIONS, duration=duration,
                                force_python=force_python)  # fmt: skip
                attack_proc = subprocess.Popen(
                    [sys.executable, str(BENCH / "stallload.py"), server.url + path,
                     "--clients", str(clients), "--seconds", str(duration + 2)],
                    stdout=subprocess.PIPE, text=True,
                )  # fmt: skip
                try:
                    time.sleep(1.0)  # the stalled clients in, their requests started
                    stalled = run_load(url, connections=STALL_LOAD_CONNECTIONS,
                                       duration=duration, force_python=force_python)
                finally:
                    stdout, _ = attack_proc.communicate(timeout=duration + 90)
                runs[case]["calm"].append(calm)
                runs[case]["stalled"].append(stalled)
                runs[case]["attack"].append(json.loads(stdout))
                runs[case]["settle"].append(settle(server, variant, admin_dsn))
                say(
                    f"stall round {r + 1}/{rounds} {case}: calm {calm['rps']:.0f} req/s,"
                    f" stalled {stalled['rps']:.0f} req/s, p99 {stalled['p99_ms']:.0f} ms,"
                    f" {stalled['errors'] + stalled['non2xx']} bad;"
                    f" attack {runs[case]['attack'][-1]['outcomes']}"
                )
        for case, variant, path in STALL_CASES:
            data = runs[case]
            log = srv[variant].log_text()
            out["cases"][case] = {
                "variant": variant,
                "attacked": path,
                "calm_rps_median": statistics.median(c["rps"] for c in data["calm"]),
                "stalled_rps_median": statistics.median(s["rps"] for s in data["stalled"]),
                "ratio_median": statistics.median(
                    s["rps"] / c["rps"] for c, s in zip(data["calm"], data["stalled"], strict=True)
                ),
                "calm_p50_ms": statistics.median(c["p50_ms"] for c in data["calm"]),
                "calm_p99_ms": statistics.median(c["p99_ms"] for c in data["calm"]),
                "stalled_p50_ms": statistics.median(s["p50_ms"] for s in data["stalled"]),
                "stalled_p99_ms": statistics.median(s["p99_ms"] for s in data["stalled"]),
                "stalled_ok": sum(s["requests"] - s["non2xx"] for s in data["stalled"]),
                "stalled_bad": sum(s["errors"] + s["non2xx"] for s in data["stalled"]),
                "calm_bad": sum(c["errors"] + c["non2xx"] for c in data["calm"]),
                "leak_free": all(s["clean"] for s in data["settle"]),
                "log_tracebacks": log.count("Traceback"),
                "runs": data,
            }
    return out


def stall_table(result: dict[str, Any], rst: bool = False) -> list[str]:
    head = ["case", "calm req/s", "stalled req/s", "stalled ÷ calm", "calm p50 / p99 ms",
            "stalled p50 / p99 ms", "stalled ok / failed", "leak-free"]  # fmt: skip
    rows = []
    for case, row in result["cases"].items():
        stalled_lat = (
            f"{_f(row['stalled_p50_ms'], 1)} / {_f(row['stalled_p99_ms'], 1)}"
            if row["stalled_ok"] else "-"
        )
        rows.append([
            case, _f(row["calm_rps_median"]), _f(row["stalled_rps_median"]),
            _f(row["ratio_median"], 3),
            f"{_f(row['calm_p50_ms'], 1)} / {_f(row['calm_p99_ms'], 1)}", stalled_lat,
            f"{row['stalled_ok']} / {row['stalled_bad']}",
            "yes" if row["leak_free"] else "NO",
        ])  # fmt: skip
    return render(head, rows, rst)


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


def _f(x: float, digits: int = 0) -> str:
    return f"{x:.{digits}f}"


def http_table(result: dict[str, Any], rst: bool = False) -> list[str]:
    if rst:
        return compact_table(result)
    head = ["endpoint", "variant", "req/s", "range", "p50 ms", "p99 ms",
            "÷ (a)", "÷ (a) range", "÷ (e)", "CPU µs/req", "CPU ÷ (a)", "CPU ÷ (e)"]  # fmt: skip
    rows = []
    for ep, by_variant in result["summary"].items():
        for variant, row in by_variant.items():
            rows.append([
                f"/{ep}", label(variant), _f(row["rps_median"]),
                f"{_f(row['rps_min'])}-{_f(row['rps_max'])}",
                _f(row["p50_ms"], 2), _f(row["p99_ms"], 2),
                _f(row["ratio_bare"], 3) if "ratio_bare" in row else "",
                f"{_f(row['ratio_bare_min'], 2)}-{_f(row['ratio_bare_max'], 2)}"
                if "ratio_bare" in row else "",
                _f(row["ratio_plain"], 3) if "ratio_plain" in row else "",
                _f(row["cpu_us_median"]),
                _f(row["cpu_ratio_bare"], 3) if "cpu_ratio_bare" in row else "",
                _f(row["cpu_ratio_plain"], 3) if "cpu_ratio_plain" in row else "",
            ])  # fmt: skip
    return render(head, rows, rst)


def compact_table(result: dict[str, Any]) -> list[str]:
    """The docs' table: ratios against (a) for the database endpoints, (e) for /nodb."""
    head = ["endpoint", "variant", "req/s (min-max)", "p50 / p99 ms", "÷ ref (min-max)",
            "CPU µs/req", "CPU ÷ ref"]  # fmt: skip
    rows = []
    for ep, by_variant in result["summary"].items():
        ref = "plain" if "plain" in by_variant else "bare"
        for variant, row in by_variant.items():
            rows.append([
                f"/{ep}", label(variant),
                f"{_f(row['rps_median'])} ({_f(row['rps_min'])}-{_f(row['rps_max'])})",
                f"{_f(row['p50_ms'], 1)} / {_f(row['p99_ms'], 1)}",
                f"{_f(row[f'ratio_{ref}'], 3)} ({_f(row[f'ratio_{ref}_min'], 2)}-"
                f"{_f(row[f'ratio_{ref}_max'], 2)})",
                _f(row["cpu_us_median"]),
                _f(row[f"cpu_ratio_{ref}"], 3),
            ])  # fmt: skip
    return render(head, rows, True)


def render(head: list[str], rows: list[list[str]], rst: bool) -> list[str]:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    if rst:
        rule = "  ".join("=" * w for w in widths)
        lines = [rule, "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)), rule]
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines.append(rule)
        return [line.rstrip() for line in lines]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return [line.rstrip() for line in lines]


def storm_table(result: dict[str, Any], rst: bool = False) -> list[str]:
    head = ["variant", "calm req/s", "storm req/s", "storm ÷ calm", "range", "calm p99 ms",
            "storm p99 ms", "leak-free"]  # fmt: skip
    rows = []
    for variant, row in result["variants"].items():
        rows.append([
            label(variant), _f(row["calm_rps_median"]), _f(row["storm_rps_median"]),
            _f(row["ratio_median"], 3), f"{_f(row['ratio_min'], 2)}-{_f(row['ratio_max'], 2)}",
            _f(row["calm_p99_ms"], 1), _f(row["storm_p99_ms"], 1),
            "yes" if row["leak_free"] else "NO",
        ])  # fmt: skip
    return render(head, rows, rst)


def targets(results: dict[str, Any]) -> list[str]:
    lines = []
    for wc, res in results.get("http", {}).items():
        s = res["summary"]
        for ep in ("select1", "read"):
            eager = s[ep]["eager"]["ratio_bare"]
            lines.append(
                f"eager ÷ (a) on /{ep}, {wc}: {eager:.3f} (target ≥ 0.95):"
                f" {'met' if eager >= 0.95 else 'MISSED'}; by CPU per request (robust to"
                f" other load): (a) ÷ eager = {1 / s[ep]['eager']['cpu_ratio_bare']:.3f}"
            )
        lazy = s["nodb"]["lazy"]["ratio_plain"]
        lines.append(
            f"lazy ÷ plain Flask on /nodb, {wc}: {lazy:.3f} (target ≥ 0.99):"
            f" {'met' if lazy >= 0.99 else 'MISSED'}; by CPU per request: plain ÷ lazy ="
            f" {1 / s['nodb']['lazy']['cpu_ratio_plain']:.3f}"
        )
    for wc, res in results.get("http", {}).items():
        s = res["summary"]
        for variant in ("eager", "lazy"):
            verdicts = []
            for ep in ENDPOINTS:
                ours = s[ep][variant]["rps_median"]
                theirs = s[ep]["fsqla"]["rps_median"]
                verdicts.append(f"/{ep} {ours / theirs:.2f}x")
            lines.append(f"{variant} vs Flask-SQLAlchemy, {wc}: " + ", ".join(verdicts))
    for key in ("ablation", "ablation_sync"):
        s = results.get(key, {}).get("summary", {})
        for ep, by_variant in s.items():
            if "floor-all" in by_variant:
                floor = by_variant["floor-all"]["ratio_bare"]
                eager = by_variant["eager"]["rps_median"] / by_variant["floor-all"]["rps_median"]
                lines.append(
                    f"floor-all ÷ (a) on /{ep}, {results[key]['worker_class']}: {floor:.3f}:"
                    f" the target 0.95 is {'above' if floor < 0.95 else 'within'} the floor"
                    f" (eager ÷ floor-all = {eager:.3f})"
                )
    storm = results.get("storm")
    if storm and "eager" in storm["variants"]:
        row = storm["variants"]["eager"]
        lines.append(
            f"storm under load (eager): normal clients at {row['ratio_median']:.3f} of calm"
            f" (target ≥ 0.9): {'met' if row['ratio_median'] >= 0.9 else 'MISSED'};"
            f" leak-free: {'yes' if row['leak_free'] else 'NO'}"
        )
    return lines


def report(results: dict[str, Any], rst: bool = False) -> str:
    lines: list[str] = []
    m = results["machine"]
    lines.append(
        f"{m['date']}  {m['nproc']} x {m['cpu']}  Linux {m['kernel']}  Python {m['python']}"
        f"  PostgreSQL {m['postgresql']}  load: {m['load_tool']}  git {m['git']}"
    )
    lines.append(", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    for wc, res in results.get("http", {}).items():
        lines.append("")
        lines.append(
            f"gunicorn {wc}: {res['workers']} workers x {res['threads']} threads,"
            f" pool {results['pool_size']} per worker, {res['connections']} connections,"
            f" {res['rounds']} rounds x {res['duration']:g} s per cell"
        )
        lines += http_table(res, rst)
    for key in ("ablation", "ablation_sync"):
        if key not in results:
            continue
        res = results[key]
        lines.append("")
        lines.append(
            f"what each safety feature costs, and every guarantee at its least (floor-all),"
            f" gunicorn {res['worker_class']}: {res['rounds']} rounds x {res['duration']:g} s"
            " per cell"
        )
        lines += http_table(res, rst)
    if "storm" in results:
        st = results["storm"]
        lines.append("")
        lines.append(
            f"storm under load: 64 clients on /read, {st['aborts']} aborts per storm over"
            f" {st['duration']} s, {st['rounds']} rounds (gthread {st['workers']}x{st['threads']})"
        )
        lines += storm_table(st, rst)
    if "stall" in results:
        st = results["stall"]
        lines.append("")
        lines.append(
            f"clients that stall: {st['connections']} connections of load on /read,"
            f" {st['clients']} stalled uploads (slow-body and stalled-body, pool"
            f" {st['pool_size']}), {st['rounds']} rounds x {st['duration']} s"
            f" (gthread {st['workers']}x{st['threads']})"
        )
        lines += stall_table(st, rst)
    lines.append("")
    lines += targets(results)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (about 3 minutes)")
    parser.add_argument("--rounds", type=int, help="rounds per worker class (default 4; quick 2)")
    parser.add_argument("--duration", type=int, help="seconds per cell (default 3; quick 1)")
    parser.add_argument("--worker-class", choices=["gthread", "sync"], action="append",
                        help="only this worker class (repeatable; default both)")
    parser.add_argument("--skip-micro", action="store_true")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--skip-storm", action="store_true")
    parser.add_argument("--skip-ablation", action="store_true")
    parser.add_argument("--skip-stall", action="store_true")
    parser.add_argument("--stall-clients", type=int, default=6,
                        help="stalled uploads at once in the stall step (default 6)")
    parser.add_argument("--python-client", action="store_true", help="do not use wrk")
    parser.add_argument("--storm-variants", default="eager,eager-nocancel,bare",
                        help="comma-separated variants for the storm")
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    args = parser.parse_args(argv)

    bootstrap()
    import pgsetup
    from loadgen import WRK

    quick = args.quick
    rounds = args.rounds or (2 if quick else 4)
    duration = args.duration or (1 if quick else 3)
    args.out.mkdir(parents=True, exist_ok=True)
    # gunicorn's logs (and the config files flask_reqconn.testing writes) stay out of the tree
    log_dir = Path(tempfile.mkdtemp(prefix="reqconn-bench-logs-"))
    force_python = args.python_client or WRK is None
    if WRK is None:
        say("wrk not found (apt-get install -y wrk): using the Python load client")
    began = time.monotonic()
    results: dict[str, Any] = {"quick": quick, "pool_size": args.pool_size, "http": {}}
    say(f"starting PostgreSQL and seeding {args.rows} rows")
    with pgsetup.bench_database(args.rows) as (dsn, admin_dsn):
        results["machine"] = machine_info(dsn, None if force_python else WRK)
        if not args.skip_micro:
            say("micro: in-process per-request path, hook timers, profile")
            micro_json = args.out / "micro.json"
            done = subprocess.run(
                [sys.executable, str(BENCH / "micro.py"), "--dsn", dsn, "--rows", str(args.rows),
                 "--json", str(micro_json), "--profile-dir", str(args.out),
                 *(["--quick"] if quick else [])],
                env={**os.environ, "BENCH_POOL_SIZE": str(args.pool_size)},
            )  # fmt: skip
            if done.returncode == 0:
                results["micro"] = json.loads(micro_json.read_text())
            else:  # keep going: the HTTP figures do not depend on it
                say(f"micro.py failed (exit {done.returncode}); continuing without it")
        if not args.skip_http:
            for wc in args.worker_class or ["gthread", "sync"]:
                wc_rounds = rounds if wc == "gthread" or quick else max(2, rounds - 2)
                wc_duration = duration if wc == "gthread" or quick else max(1, duration - 1)
                results["http"][wc] = http_matrix(
                    dsn, admin_dsn, worker_class=wc, rounds=wc_rounds, duration=wc_duration,
                    pool_size=args.pool_size, rows=args.rows, log_dir=log_dir,
                    force_python=force_python,
                )  # fmt: skip
                print("\n".join(http_table(results["http"][wc])), flush=True)
        for wc in [] if args.skip_http or args.skip_ablation else (
            args.worker_class or ["gthread", "sync"]
        ):
            # every variant run under gthread also runs under sync
            key = "ablation" if wc == "gthread" else f"ablation_{wc}"
            results[key] = http_matrix(
                dsn, admin_dsn, worker_class=wc, rounds=2 if quick else 4,
                duration=duration if wc == "gthread" or quick else max(1, duration - 1),
                pool_size=args.pool_size, rows=args.rows, log_dir=log_dir,
                force_python=force_python, plan=ABLATION,
            )  # fmt: skip
            print("\n".join(http_table(results[key])), flush=True)
        if not args.skip_storm:
            results["storm"] = storm_under_load(
                dsn, admin_dsn, variants=args.storm_variants.split(","),
                rounds=1 if quick else 2,
                duration=5 if quick else 8, aborts=1000, pool_size=args.pool_size,
                rows=args.rows, log_dir=log_dir, force_python=force_python,
            )  # fmt: skip
        if not args.skip_stall:
            results["stall"] = stalled_under_load(
                dsn, admin_dsn, rounds=2 if quick else 3, duration=4 if quick else 6,
                clients=args.stall_clients, pool_size=args.pool_size, rows=args.rows,
                log_dir=log_dir, force_python=force_python,
            )  # fmt: skip
            print("\n".join(stall_table(results["stall"])), flush=True)
        results["machine"]["loadavg_end"] = os.getloadavg()
    results["seconds"] = round(time.monotonic() - began, 1)
    text = report(results)
    print("\n" + text, flush=True)
    (args.out / "latest.json").write_text(json.dumps(results, indent=1, default=str))
    (args.out / "latest.txt").write_text(text + "\n")
    (args.out / "latest.rst").write_text(report(results, rst=True) + "\n")
    say(f"done in {results['seconds']:.0f} s; results in {args.out}; server logs in {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
