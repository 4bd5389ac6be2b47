"""In-process microbenchmark of flask-reqconn's per-request path, and a profile.

No HTTP server: each request is a plain WSGI call (``app(environ, start_response)``,
body joined, ``close()`` called), with a connected socket in
``environ["gunicorn.socket"]`` so that the client-gone peeks run as under gunicorn.

Three parts, each printed and returned as JSON:

1. **per request**: microseconds (wall and this thread's CPU) per request for each
   variant, batches interleaved over rounds; deltas against plain Flask (``/nodb``)
   and against the bare pool (``/select1``).
2. **hooks**: the eager and lazy paths with a timer around every hook and the calls
   inside them (client-gone peek, ``getconn``, hand-back SQL, ``putconn``...).
3. **profile**: cProfile of the same loops, time grouped by package, and the
   functions of ``flask_reqconn`` with their own time.

Run alone: ``.venv/bin/python bench/micro.py --dsn CONNINFO`` (``run.py`` does this).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import benchapp

HERE = Path(__file__).resolve().parent

WSGIApp = Callable[..., Iterable[bytes]]

# (label, variant, path, extra REQCONN_* config). The "eager -X" rows switch single
# features off, to show what each costs.
NO_PREPARE = {"REQCONN_CONNECT_ARGS": {"prepare_threshold": None}}
ALL_OFF = {
    "REQCONN_RESET_SESSION": False,
    "REQCONN_CHECK_CLIENT": False,
    "REQCONN_CANCEL_ON_DISCONNECT": "off",
}
CASES: list[tuple[str, str, str, dict[str, Any]]] = [
    ("plain /nodb", "plain", "/nodb", {}),
    ("lazy /nodb", "lazy", "/nodb", {}),
    ("eager /nodb (checks out)", "eager", "/nodb", {}),
    ("fsqla /nodb", "fsqla", "/nodb", {}),
    ("bare /select1", "bare", "/select1", {}),
    ("eager /select1", "eager", "/select1", {}),
    ("eager -reset /select1", "eager", "/select1", {"REQCONN_RESET_SESSION": False}),
    ("eager -check_client /select1", "eager", "/select1", {"REQCONN_CHECK_CLIENT": False}),
    (
        "eager -cancel_on_disconnect /select1",
        "eager",
        "/select1",
        {"REQCONN_CANCEL_ON_DISCONNECT": "off"},
    ),
    ("eager -prepared /select1", "eager", "/select1", NO_PREPARE),
    ("eager -all four /select1", "eager", "/select1", {**ALL_OFF, **NO_PREPARE}),
    ("lazy /select1", "lazy", "/select1", {}),
    ("fsqla /select1", "fsqla", "/select1", {}),
]
REFERENCE = {"/nodb": "plain /nodb", "/select1": "bare /select1"}


# --------------------------------------------------------------------------------------
# Driving a WSGI app
# --------------------------------------------------------------------------------------


class Client:
    """Calls one WSGI app in a loop, as a WSGI server would."""

    def __init__(self, app: WSGIApp, path: str) -> None:
        self.app = app
        self.sock, self._peer = socket.socketpair()
        self.base = {
            "REQUEST_METHOD": "GET",
            "SCRIPT_NAME": "",
            "PATH_INFO": path,
            "QUERY_STRING": "",
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8000",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1",
            "HTTP_HOST": "127.0.0.1:8000",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "gunicorn.socket": self.sock,
        }
        self.status = ""

    def _start_response(self, status: str, headers: Any, exc_info: Any = None) -> Any:
        self.status = status
        return None

    def request(self) -> bytes:
        environ = dict(self.base)
        environ["wsgi.input"] = io.BytesIO()
        body = self.app(environ, self._start_response)
        try:
            return b"".join(body)
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()

    def loop(self, n: int) -> None:
        request = self.request
        for _ in range(n):
            request()

    def close(self) -> None:
        self.sock.close()
        self._peer.close()


def build(variant: str, extra: dict[str, Any]) -> Any:
    return benchapp.create_app(variant, **extra)


def close_app(app: Any) -> None:
    state = app.extensions.get("reqconn")
    if state is not None:
        state.close()
    pool = app.extensions.get("bench_pool")
    if pool is not None:
        pool.close()
    sqla = app.extensions.get("sqlalchemy")
    if sqla is not None:
        with app.app_context():
            sqla.engine.dispose()


# --------------------------------------------------------------------------------------
# 1. Per request
# --------------------------------------------------------------------------------------


def per_request(
    rounds: int,
    batch: int,
    db_batch: int,
    cases: list[tuple[str, str, str, dict[str, Any]]] | None = None,
    raw: bool = False,
) -> dict[str, Any]:
    clients: dict[str, Client] = {}
    apps = []
    for label, variant, path, extra in cases or CASES:
        app = build(variant, extra)
        apps.append(app)
        client = Client(app, path)
        client.loop(200)  # warm: pools open, statements prepared, caches filled
        if not client.status.startswith("200"):
            raise SystemExit(f"{label}: {client.status}")
        clients[label] = client
    wall: dict[str, list[float]] = {label: [] for label in clients}
    cpu: dict[str, list[float]] = {label: [] for label in clients}
    ratios: dict[str, list[float]] = {label: [] for label in clients}
    labels = list(clients)
    for r in range(rounds):
        order = labels if r % 2 == 0 else labels[::-1]
        this_round: dict[str, float] = {}
        for label in order:
            n = batch if label.endswith("/nodb") or "/nodb " in label else db_batch
            client = clients[label]
            w0, c0 = time.perf_counter(), time.thread_time()
            client.loop(n)
            w, c = time.perf_counter() - w0, time.thread_time() - c0
            wall[label].append(w / n * 1e6)
            cpu[label].append(c / n * 1e6)
            this_round[label] = c / n * 1e6
        for label in labels:
            ref = REFERENCE[_path_of(label)]
            if ref in this_round:
                ratios[label].append(this_round[label] / this_round[ref])
    for client in clients.values():
        client.close()
    for app in apps:
        close_app(app)
    if raw:
        return {"wall": wall, "cpu": cpu}
    result = {}
    for label in labels:
        ref = REFERENCE[_path_of(label)]
        result[label] = {
            "wall_us": statistics.median(wall[label]),
            "wall_us_p10": _p10(wall[label]),
            "cpu_us": statistics.median(cpu[label]),
            "cpu_us_p10": _p10(cpu[label]),
            "cpu_ratio_to_ref": statistics.median(ratios[label]),
            "cpu_delta_us_p10": _p10(cpu[label]) - _p10(cpu[ref]),
            "reference": ref,
        }
    return result


def _p10(values: list[float]) -> float:
    """The 10th percentile: the cost with the least interference from other processes."""
    ordered = sorted(values)
    return ordered[len(ordered) // 10]


def _path_of(label: str) -> str:
    return "/nodb" if "/nodb" in label else "/select1"


def print_per_request(result: dict[str, Any]) -> None:
    print(
        "\n== per request, in process (µs; p10 = 10th percentile over batches, the least"
        " disturbed;\n   CPU = this thread's CPU time; ratio = median over rounds of CPU"
        " against the reference in the same round)"
    )
    print(
        f"{'case':38} {'wall p10':>8} {'wall med':>8} {'CPU p10':>8} {'CPU med':>8}"
        f" {'ΔCPU p10':>8} {'ratio':>6}"
    )
    for label, row in result.items():
        print(
            f"{label:38} {row['wall_us_p10']:8.1f} {row['wall_us']:8.1f} {row['cpu_us_p10']:8.1f}"
            f" {row['cpu_us']:8.1f} {row['cpu_delta_us_p10']:8.1f} {row['cpu_ratio_to_ref']:6.3f}"
        )
    print("  Δ and ratio: against plain Flask for /nodb, against the bare pool for /select1")


# --------------------------------------------------------------------------------------
# 2. Hook timers
# --------------------------------------------------------------------------------------


class Timers:
    def __init__(self) -> None:
        self.ns: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        ns, calls = self.ns, self.calls
        ns.setdefault(name, 0)
        calls.setdefault(name, 0)
        clock = time.perf_counter_ns

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                ns[name] += clock() - t0
                calls[name] += 1

        return timed

    def reset(self) -> None:
        for name in self.ns:
            self.ns[name] = 0
            self.calls[name] = 0


def _wrapper_overhead_ns() -> float:
    timers = Timers()

    def noop() -> None:
        return None

    timed = timers.wrap("noop", noop)
    n = 200_000
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            timed()
        with_wrapper = time.perf_counter_ns() - t0
        t0 = time.perf_counter_ns()
        for _ in range(n):
            noop()
        bare = time.perf_counter_ns() - t0
        best = min(best, (with_wrapper - bare) / n)
    return best


def _hook_of(funcs: dict[Any, list[Any]], name: str, state: Any) -> Any:
    """The app-wide hook of flask-reqconn called *name* (``before_request``...), if any.

    Today's hooks are ``functools.partial(checkout.<name>, state)``; older
    versions registered bound methods ``state.<name>``.
    """
    for fn in funcs.get(None, []):
        func = getattr(fn, "func", None)
        if func is not None and getattr(func, "__name__", "") == name and state in fn.args:
            return fn
        if getattr(fn, "__name__", "") == name and getattr(fn, "__self__", None) is state:
            return fn
    return None


def _replace_hook(funcs: dict[Any, list[Any]], original: Any, replacement: Any) -> None:
    """Swap a registered app-wide hook for its timed version (if it is registered)."""
    hooks = funcs.get(None, [])
    for i, fn in enumerate(hooks):
        if fn is original:
            hooks[i] = replacement
            return


def instrument_reqconn(app: Any, timers: Timers, endpoint: str) -> Callable[[], None]:
    """Put timers around flask-reqconn's hooks in *app*; return a function undoing it."""
    import flask_reqconn.extension as ext_mod
    import flask_reqconn.pool as pool_mod
    from flask_reqconn.lease import Lease

    state = app.extensions["reqconn"]
    pools = getattr(state, "pools", None) or state.holders
    holder = pools["default"]
    pool = holder.pool
    guard = app.wsgi_app
    undo: list[Callable[[], None]] = []

    original_inner = guard.app
    guard.app = timers.wrap("flask wsgi_app", original_inner)
    undo.append(lambda: setattr(guard, "app", original_inner))
    app.wsgi_app = timers.wrap("request (LeaseGuard)", guard)
    undo.append(lambda: setattr(app, "wsgi_app", guard))

    for funcs, name in (
        (app.before_request_funcs, "before_request"),
        (app.after_request_funcs, "after_request"),
        (app.teardown_request_funcs, "teardown_request"),
    ):
        hook = _hook_of(funcs, name, state)
        if hook is not None:
            _replace_hook(funcs, hook, timers.wrap(f"{name} hook", hook))
    view = app.view_functions[endpoint]
    app.view_functions[endpoint] = timers.wrap("view", view)
    undo.append(lambda: app.view_functions.__setitem__(endpoint, view))

    def wrap_attr(obj: Any, attr: str, name: str) -> None:
        """Time *obj.attr* if this version of flask_reqconn has it."""
        original = getattr(obj, attr, None)
        if original is None:
            return
        own = attr in getattr(obj, "__dict__", {})
        setattr(obj, attr, timers.wrap(name, original))
        if own:
            undo.append(lambda: setattr(obj, attr, original))
        else:
            undo.append(lambda: delattr(obj, attr))

    try:
        import flask_reqconn.clientgone as cg_mod  # older flask_reqconn
    except ImportError:
        cg_mod = None

    # the client-gone peek: the socket probe's gone() in flask_reqconn.probes today,
    # ClientProbe.gone before, a function before that
    try:
        from flask_reqconn.probes import SocketProbe
    except ImportError:
        SocketProbe = None  # noqa: N806 - older flask_reqconn
    if SocketProbe is not None:
        wrap_attr(SocketProbe, "gone", "client_gone peek")
    elif cg_mod is not None and hasattr(cg_mod, "ClientProbe"):
        wrap_attr(cg_mod.ClientProbe, "gone", "client_gone peek")
    else:
        wrap_attr(ext_mod, "client_gone", "client_gone peek")
    wrap_attr(pool_mod, "clean_connection", "clean_connection (hand-back SQL)")
    wrap_attr(Lease, "release", "Lease.release")
    wrap_attr(Lease, "watch_client_later", "watcher.watch_client")
    try:
        from flask_reqconn.watcher import get_watcher
    except ImportError:  # older flask_reqconn without a watcher
        get_watcher = None
    if get_watcher is not None:
        watcher = get_watcher()
        for attr in ("watch_client", "watch_client_later"):
            wrap_attr(watcher, attr, "watcher.watch_client")
        wrap_attr(watcher, "unwatch", "watcher.unwatch")
    wrap_attr(holder, "checkout", "PoolHolder.checkout")
    wrap_attr(holder, "give_back", "PoolHolder.give_back")
    wrap_attr(pool, "getconn", "pool.getconn")
    wrap_attr(pool, "putconn", "pool.putconn")
    counters = holder.counters
    wrap_attr(counters, "checked_out", "counters")
    wrap_attr(counters, "released", "counters")

    def restore() -> None:
        for fn in reversed(undo):
            fn()

    return restore


# name, parent, wrapped timers nested inside it (for the overhead correction)
HOOK_TREE: list[tuple[str, str | None]] = [
    ("request (LeaseGuard)", None),
    ("flask wsgi_app", "request (LeaseGuard)"),
    ("before_request hook", "flask wsgi_app"),
    ("client_gone peek", "before_request hook"),
    ("PoolHolder.checkout", "before_request hook"),
    ("pool.getconn", "PoolHolder.checkout"),
    ("watcher.watch_client", "before_request hook"),
    ("view", "flask wsgi_app"),
    ("after_request hook", "flask wsgi_app"),
    ("teardown_request hook", "flask wsgi_app"),
    ("Lease.release", "teardown_request hook"),
    ("watcher.unwatch", "Lease.release"),
    ("PoolHolder.give_back", "Lease.release"),
    ("clean_connection (hand-back SQL)", "PoolHolder.give_back"),
    ("pool.putconn", "PoolHolder.give_back"),
    ("counters", None),
]


def hook_costs(cases: list[tuple[str, str, str, dict[str, Any]]], n: int) -> dict[str, Any]:
    overhead = _wrapper_overhead_ns()
    out: dict[str, Any] = {"wrapper_overhead_ns": overhead, "cases": {}}
    for label, variant, path, extra in cases:
        app = build(variant, extra)
        client = Client(app, path)
        client.loop(200)
        timers = Timers()
        restore = instrument_reqconn(app, timers, path.strip("/"))
        client.loop(200)
        timers.reset()
        client.loop(n)
        restore()
        client.close()
        close_app(app)
        rows = {}
        for name, _parent in HOOK_TREE:
            calls = timers.calls.get(name, 0)
            if not calls:
                continue
            # Every timed call nested inside this one added the wrapper overhead.
            nested = sum(timers.calls.get(child, 0) for child in _descendants(name))
            corrected = (timers.ns[name] - nested * overhead) / n / 1000
            rows[name] = {"us_per_request": corrected, "calls_per_request": calls / n}
        total = rows["request (LeaseGuard)"]["us_per_request"]
        inner = rows["flask wsgi_app"]["us_per_request"]
        rows["LeaseGuard own"] = {"us_per_request": total - inner, "calls_per_request": 1.0}
        hooks = sum(
            rows.get(h, {}).get("us_per_request", 0.0)
            for h in ("before_request hook", "after_request hook", "teardown_request hook")
        )
        rows["Flask itself (rest of wsgi_app)"] = {
            "us_per_request": inner - hooks - rows["view"]["us_per_request"],
            "calls_per_request": 1.0,
        }
        out["cases"][label] = rows
    return out


def _descendants(name: str) -> list[str]:
    found = []
    todo = [name]
    while todo:
        parent = todo.pop()
        for child, p in HOOK_TREE:
            if p == parent:
                found.append(child)
                todo.append(child)
    if name in (
        "PoolHolder.checkout",
        "Lease.release",
        "before_request hook",
        "teardown_request hook",
        "flask wsgi_app",
        "request (LeaseGuard)",
        "PoolHolder.give_back",
    ):
        found.append("counters")
    return found


def print_hooks(result: dict[str, Any]) -> None:
    print(
        "\n== hook timers (µs per request, wall; corrected for the timer's own"
        f" {result['wrapper_overhead_ns']:.0f} ns per call)"
    )
    for label, rows in result["cases"].items():
        print(f"  {label}")
        order = [name for name, _ in HOOK_TREE]
        order += ["LeaseGuard own", "Flask itself (rest of wsgi_app)"]
        depth = {name: _depth(name) for name, _ in HOOK_TREE}
        depth["LeaseGuard own"] = 1
        depth["Flask itself (rest of wsgi_app)"] = 2
        for name in order:
            if name not in rows:
                continue
            row = rows[name]
            indent = "  " * depth.get(name, 1)
            calls = row["calls_per_request"]
            times = f" (x{calls:.0f})" if calls and abs(calls - 1) > 0.01 else ""
            print(f"    {indent}{name + times:<44} {row['us_per_request']:8.1f}")


def _depth(name: str) -> int:
    parents = dict(HOOK_TREE)
    d = 0
    while parents.get(name):
        name = parents[name]  # type: ignore[assignment]
        d += 1
    return d


# --------------------------------------------------------------------------------------
# 3. Profile
# --------------------------------------------------------------------------------------


def _package_of(filename: str, funcname: str) -> str:
    if filename == "~":
        if "psycopg_binary" in funcname or "psycopg_c" in funcname:
            return "psycopg C extension"
        if "socket" in funcname or "select" in funcname or "poll" in funcname:
            return "socket/select syscalls"
        return "builtins"
    for key, name in (
        ("/flask_reqconn/", "flask_reqconn (ours)"),
        ("/psycopg_pool/", "psycopg_pool"),
        ("/psycopg/", "psycopg"),
        ("/flask_sqlalchemy/", "flask_sqlalchemy"),
        ("/sqlalchemy/", "sqlalchemy"),
        ("/flask/", "flask"),
        ("/werkzeug/", "werkzeug"),
        ("/bench/", "bench app + driver"),
    ):
        if key in filename:
            return name
    return "stdlib"


def profile(
    cases: list[tuple[str, str, str, dict[str, Any]]], n: int, out_dir: Path | None
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for label, variant, path, extra in cases:
        app = build(variant, extra)
        client = Client(app, path)
        client.loop(300)
        prof = cProfile.Profile()
        prof.enable()
        client.loop(n)
        prof.disable()
        client.close()
        close_app(app)
        stats = pstats.Stats(prof)
        raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
        total = sum(v[2] for v in raw.values())
        by_package: dict[str, float] = {}
        ours = []
        for (filename, line, func), (_cc, nc, tt, ct, _callers) in raw.items():
            pkg = _package_of(filename, func)
            by_package[pkg] = by_package.get(pkg, 0.0) + tt
            if "/flask_reqconn/" in filename:
                ours.append(
                    {
                        "function": f"{Path(filename).name}:{line}({func})",
                        "calls_per_request": nc / n,
                        "own_us": tt / n * 1e6,
                        "cumulative_us": ct / n * 1e6,
                    }
                )
        ours.sort(key=lambda row: -row["own_us"])
        top = sorted(raw.items(), key=lambda kv: -kv[1][2])[:15]
        result[label] = {
            "total_us_per_request": total / n * 1e6,
            "by_package_us": {
                k: v / n * 1e6 for k, v in sorted(by_package.items(), key=lambda kv: -kv[1])
            },
            "ours": ours,
            "top": [
                {
                    "function": f"{_short(fn)}:{line}({func})",
                    "own_us": tt / n * 1e6,
                    "calls_per_request": nc / n,
                }
                for (fn, line, func), (_cc, nc, tt, _ct, _c) in top
            ],
        }
        if out_dir is not None:
            slug = label.replace(" ", "_").replace("/", "")
            prof.dump_stats(str(out_dir / f"profile-{slug}.prof"))
    return result


def _short(filename: str) -> str:
    if filename == "~":
        return "~"
    parts = Path(filename).parts
    for anchor in ("site-packages", "flask_reqconn", "bench"):
        if anchor in parts:
            i = parts.index(anchor)
            return "/".join(parts[i + 1 :] if anchor == "site-packages" else parts[i:])
    return Path(filename).name


def print_profile(result: dict[str, Any]) -> None:
    for label, data in result.items():
        print(
            f"\n== cProfile: {label} — {data['total_us_per_request']:.0f} µs per request under"
            " the profiler (inflated; compare shares, not absolutes)"
        )
        total = data["total_us_per_request"]
        for pkg, us in data["by_package_us"].items():
            print(f"    {pkg:28} {us:8.1f} µs  {us / total:6.1%}")
        print("  flask_reqconn functions (own time, cumulative):")
        for row in data["ours"][:12]:
            print(
                f"    {row['function']:60} x{row['calls_per_request']:<4.0f}"
                f" own {row['own_us']:6.1f}  cum {row['cumulative_us']:7.1f}"
            )
        print("  top functions by own time:")
        for row in data["top"][:10]:
            print(f"    {row['function']:80} {row['own_us']:7.1f}")


# --------------------------------------------------------------------------------------


def run(dsn: str, *, quick: bool, out_dir: Path | None, rows: int = 100_000) -> dict[str, Any]:
    os.environ["BENCH_DSN"] = dsn
    os.environ.setdefault("BENCH_POOL_SIZE", "4")
    os.environ["BENCH_ROWS"] = str(rows)
    rounds, batch, db_batch = (8, 200, 100) if quick else (30, 300, 100)
    results: dict[str, Any] = {}
    results["per_request"] = per_request(rounds, batch, db_batch)
    print_per_request(results["per_request"])
    hook_cases = [
        c
        for c in CASES
        if c[0]
        in (
            "lazy /nodb",
            "eager /nodb (checks out)",
            "eager /select1",
            "eager -all four /select1",
        )
    ]
    results["hooks"] = hook_costs(hook_cases, 500 if quick else 2000)
    print_hooks(results["hooks"])
    profile_cases = [
        c
        for c in CASES
        if c[0]
        in (
            "plain /nodb",
            "lazy /nodb",
            "bare /select1",
            "eager /select1",
        )
    ]
    results["profile"] = profile(profile_cases, 500 if quick else 2000, out_dir)
    print_profile(results["profile"])
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", required=True, help="conninfo of a seeded bench database")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--profile-dir", type=Path, help="write .prof files here")
    parser.add_argument(
        "--per-request-only",
        metavar="LABELS",
        help="only part 1, for these comma-separated case labels (compare.py uses it)",
    )
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    if args.per_request_only:
        os.environ["BENCH_DSN"] = args.dsn
        os.environ.setdefault("BENCH_POOL_SIZE", "4")
        os.environ["BENCH_ROWS"] = str(args.rows)
        wanted = args.per_request_only.split(",")
        raw = per_request(args.rounds, 200, 100, [c for c in CASES if c[0] in wanted], raw=True)
        print(json.dumps(raw))
        return 0
    results = run(args.dsn, quick=args.quick, out_dir=args.profile_dir, rows=args.rows)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
