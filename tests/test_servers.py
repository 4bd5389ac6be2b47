"""The servers users deploy on: nginx in front of gunicorn, uWSGI, Granian.

Real processes on loopback, a real PostgreSQL. For every setup where the app can see its
client: a client that leaves before the checkout or during the pool wait is answered 499
without running the view, and a client that leaves during a query gets that query
cancelled. For every setup: the abort storm leaks nothing and the servers' logs stay free
of error tracebacks. Granian shows the app nothing of its client; its tests pin what is
lost (every view runs to the end) and that nothing leaks anyway.

The nginx configs are ``docs/snippets/*.conf``, included verbatim by the deployment docs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from flask_reqconn.storm import format_report
from tests import fix_servers, pg, servers
from tests.test_cancel import disconnect_after, sleeping
from tests.test_gunicorn import assert_recovered, in_threads, stats
from tests.test_matrix import POOL_SIZE, get_stats, storm

pytestmark = pytest.mark.slow

E2E_APP = "tests.apps.reqconn_app:create_app"
Spawn = Callable[..., servers.ServerProcess]

#: uWSGI options that keep a client abort out of its log (see docs/deployment.rst).
UWSGI_QUIET = ("--ignore-sigpipe", "--ignore-write-errors", "--disable-write-exception")


@dataclass
class Stack:
    """What a client talks to (``entry``) and every process of the setup."""

    entry: servers.ServerProcess
    processes: list[servers.ServerProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.entry.url


@dataclass(frozen=True)
class Setup:
    """One deployment: an app server, maybe nginx in front (a snippet of docs/snippets)."""

    server: str  # gunicorn-gthread, uwsgi-http, uwsgi-socket, granian
    nginx: str | None = None
    sees_client: bool = True

    def start(self, spawn: Spawn, app: str, env: dict[str, str], *, threads: int = 4) -> Stack:
        kind, _, variant = self.server.partition("-")
        if kind == "gunicorn":
            app_server = spawn("gunicorn", app + "()", worker_class=variant,
                               threads=threads if variant == "gthread" else 1, env=env)  # fmt: skip
        elif kind == "uwsgi":
            protocol = "http" if variant == "http" else "uwsgi"
            app_server = spawn(fix_servers.uwsgi, app, protocol=protocol, threads=threads,
                               extra_args=UWSGI_QUIET, env=env)  # fmt: skip
        elif kind == "granian":
            app_server = spawn(fix_servers.granian, app, blocking_threads=threads, env=env)
        elif kind == "werkzeug":
            app_server = spawn("werkzeug_dev", app, env=env)
        elif kind == "waitress":
            lookahead = ["--channel-request-lookahead=5"] if variant == "lookahead" else []
            app_server = spawn("waitress", app, threads=threads, extra_args=lookahead, env=env)
        else:  # pragma: no cover
            raise ValueError(self.server)
        if self.nginx is None:
            return Stack(app_server, [app_server])
        front = spawn(fix_servers.nginx, self.nginx, upstream_port=app_server.port)
        return Stack(front, [app_server, front])


SETUPS = [
    pytest.param(Setup("gunicorn-gthread", "nginx-proxy"), id="nginx-gunicorn"),
    pytest.param(Setup("gunicorn-gthread", "nginx-proxy-keepalive"), id="nginx-keepalive-gunicorn"),
    pytest.param(Setup("uwsgi-http"), id="uwsgi-http-socket"),
    pytest.param(Setup("uwsgi-socket", "nginx-uwsgi"), id="nginx-uwsgi_pass-uwsgi"),
]
GRANIAN = pytest.param(Setup("granian", sees_client=False), id="granian-wsgi")


def e2e_env(pg_dsn: str, appname: str, **extra: str) -> dict[str, str]:
    return {"RC_DSN": pg_dsn, "RC_APPNAME": appname, **extra}


# -- what the app sees of its client ------------------------------------------------------


@pytest.mark.parametrize("setup", SETUPS)
def test_clients_gone_during_the_pool_wait_are_answered_499_without_the_view(
    spawn: Spawn, pg_dsn: str, pg_admin: Any, setup: Setup
) -> None:
    appname = pg.unique_name("srv_wait")
    stack = setup.start(spawn, E2E_APP, e2e_env(pg_dsn, appname, RC_MAX_SIZE="1",
                                                RC_TIMEOUT="30"))  # fmt: skip
    holder = threading.Thread(target=servers.http_get, args=(stack.url + "/slow?s=3", 60))
    holder.start()
    pg.wait_until(lambda: sleeping(pg_admin, appname), message="the one connection busy")
    waiting = 3  # the app server has 4 threads: one holds the connection, 3 wait for it
    in_threads(waiting, lambda i: servers.send_and_close(
        stack.url, "/slow?s=5", how="after_ms", ms=300))  # fmt: skip
    holder.join(60)
    pg.wait_until(lambda: stats(stack.entry)["client_gone"] == waiting, timeout=60,
                  message="every departed waiter answered 499")  # fmt: skip
    final = assert_recovered(stack.entry, pg_admin, appname)
    print(setup, {k: final[k] for k in ("checkouts", "client_gone", "releases")})
    assert final["client_gone"] == waiting
    assert final["releases"]["teardown"] == 1  # the holder
    assert final["releases"]["client_gone"] == waiting  # seen right after the wait
    if isinstance(stack.entry, fix_servers.NginxProcess):
        assert stack.entry.statuses("/slow?s=5") == [499] * waiting


@pytest.mark.parametrize("setup", SETUPS)
def test_clients_gone_before_the_checkout_are_answered_499_without_a_connection(
    spawn: Spawn, pg_dsn: str, pg_admin: Any, setup: Setup
) -> None:
    """One request thread, busy: the others are read only after their clients left."""
    appname = pg.unique_name("srv_before")
    stack = setup.start(spawn, E2E_APP, e2e_env(pg_dsn, appname), threads=1)
    holder = threading.Thread(target=servers.http_get, args=(stack.url + "/slow?s=2", 60))
    holder.start()
    pg.wait_until(lambda: sleeping(pg_admin, appname), message="the one thread busy")
    gone = 3
    in_threads(gone, lambda i: servers.send_and_close(
        stack.url, "/slow?s=5", how="after_ms", ms=100))  # fmt: skip
    holder.join(60)
    final = pg.wait_until(lambda: (s := stats(stack.entry))["client_gone"] == gone and s,
                          timeout=60, message="every departed client answered 499")  # fmt: skip
    print(setup, {k: final[k] for k in ("checkouts", "client_gone", "releases")})
    assert final["checkouts"] == 1  # the holder's only: the others never took one
    assert final["releases"]["client_gone"] == 0
    assert_recovered(stack.entry, pg_admin, appname)


@pytest.mark.parametrize("setup", SETUPS)
def test_departed_client_query_is_cancelled_and_the_connection_comes_back(
    spawn: Spawn, pg_dsn: str, pg_admin: Any, setup: Setup
) -> None:
    appname = pg.unique_name("srv_cancel")
    stack = setup.start(spawn, E2E_APP, e2e_env(pg_dsn, appname))
    disconnect_after(stack.entry, "GET", "/slow?s=30", 0.5)
    pg.wait_until(lambda: not sleeping(pg_admin, appname), timeout=15,
                  message="the pg_sleep(30) was cancelled")  # fmt: skip
    final = assert_recovered(stack.entry, pg_admin, appname)
    assert final["cancelled"] == 1
    assert final["client_gone"] == 1
    for process in stack.processes:
        assert fix_servers.loud_lines(process) == [], process.log_tail()


def test_granian_shows_no_client_so_departed_clients_run_their_views(
    spawn: Spawn, pg_dsn: str, pg_admin: Any
) -> None:
    """What is lost under Granian: no 499 skip, no cancel; the query runs to its end."""
    appname = pg.unique_name("srv_granian")
    stack = Setup("granian").start(spawn, E2E_APP, e2e_env(pg_dsn, appname))
    disconnect_after(stack.entry, "GET", "/slow?s=1.5", 0.3)
    assert sleeping(pg_admin, appname), "the query keeps running after the client left"
    final = pg.wait_until(lambda: (s := stats(stack.entry))["releases"]["teardown"] >= 1 and s,
                          timeout=30, message="the view ran to its end")  # fmt: skip
    assert final["client_gone"] == 0 and final["cancelled"] == 0
    assert_recovered(stack.entry, pg_admin, appname)


# -- the storm, and the logs after it -----------------------------------------------------


@pytest.mark.parametrize("setup", [*SETUPS, GRANIAN])
def test_storm_leaks_nothing(
    spawn: Spawn, pg_dsn: str, pg_admin: Any, setup: Setup
) -> None:
    appname = pg.unique_name("srv_storm")
    env = {"DATABASE_URL": pg.with_conninfo(pg_dsn, application_name=appname),
           "POOL_SIZE": str(POOL_SIZE)}  # fmt: skip
    stack = setup.start(spawn, "examples.reqconn_app:create_app", env)

    # nginx buffers uwsgi_pass responses: a stream's first line can wait for its end, and
    # for a free request thread before that (a hang guard, not a latency bound)
    result = storm(stack.entry, pg_dsn, appname, abort_timeout=20.0)

    report = format_report(result)
    print(f"\n{setup}\n{report}")
    assert result.ok, report
    assert result.abort.aborted == 32 and result.abort.errors == {}, report
    assert sorted((r.source, r.after_drain, r.at_end) for r in result.leaks) == [
        ("pg", 0, 0),
        ("stats", 0, 0),
    ], report
    final = pg.wait_until(lambda: _pool_full(get_stats(stack.entry)), timeout=30,
                          message="every connection back")  # fmt: skip
    print({k: final[k] for k in ("checkouts", "client_gone", "cancelled", "releases")})
    assert final["checked_out"] == 0
    assert sum(final["releases"].values()) == final["checkouts"]
    assert final["releases"]["finalizer"] == 0
    if not setup.sees_client:
        assert final["client_gone"] == 0 and final["cancelled"] == 0
    for process in stack.processes:
        assert fix_servers.loud_lines(process) == [], process.log_tail()
    sessions = pg.app_sessions(pg_admin, appname)
    assert len(sessions) <= POOL_SIZE and all(s["state"] == "idle" for s in sessions)


def _pool_full(data: dict[str, Any]) -> dict[str, Any]:
    pool = data["pools"]["default"]["pool"]
    return data if pool["pool_available"] == pool["pool_size"] else {}


#: Every server of the matrix (tests/test_matrix.py) and of this module.
LOG_SETUPS = [
    pytest.param(Setup("gunicorn-sync"), id="gunicorn-sync"),
    pytest.param(Setup("gunicorn-gthread"), id="gunicorn-gthread"),
    pytest.param(Setup("gunicorn-gevent"), id="gunicorn-gevent"),
    pytest.param(Setup("werkzeug"), id="werkzeug-dev"),
    # without channel_request_lookahead waitress sees no client before the response, but
    # it does see a stream's client leave, once sending to it fails (measured)
    pytest.param(Setup("waitress"), id="waitress"),
    pytest.param(Setup("waitress-lookahead"), id="waitress-lookahead"),
    *SETUPS,
    GRANIAN,
]

#: The INFO line of a stream ended because its client left (flask_reqconn.middleware).
STREAM_GONE = "INFO flask_reqconn.middleware: client gone during the streamed response of"


@pytest.mark.parametrize("setup", LOG_SETUPS)
def test_no_error_traceback_in_any_server_log_after_the_storm(
    spawn: Spawn, pg_dsn: str, pg_admin: Any, setup: Setup
) -> None:
    """Every stream the storm drops is mid-query when its client leaves.

    Each chunk of ``/stream`` runs ``pg_sleep(0.2)`` before it is sent, so where the app
    sees its client the watcher cancels that query, every time. The abort must end with
    nothing worse than INFO lines in the logs of every process of the setup, and each
    dropped stream with exactly one INFO line of flask-reqconn (none where the app cannot
    see its client: there the stream runs to its end).
    """
    appname = pg.unique_name("srv_logs")
    env = e2e_env(pg_dsn, appname, RC_MAX_SIZE=str(POOL_SIZE), RC_LOG="INFO")
    stack = setup.start(spawn, E2E_APP, env)

    result = storm(stack.entry, pg_dsn, appname, stream_path="/stream?n=10&s=0.2",
                   health_path="/health", stats_url="/_stats")  # fmt: skip

    report = format_report(result)
    print(f"\n{setup}\n{report}")
    assert result.ok, report
    final = stats(stack.entry)
    print({k: final[k] for k in ("checkouts", "client_gone", "cancelled", "releases")})
    problems = {p.name: fix_servers.loud_lines(p) for p in stack.processes}
    assert problems == {p.name: [] for p in stack.processes}, "\n".join(
        p.log_tail() for p in stack.processes
    )
    app_log = stack.processes[0].log_text()
    ended = [line for line in app_log.splitlines() if line.startswith(STREAM_GONE)]
    print("\n".join(ended))
    streams = result.abort.styles["stream"]
    assert len(ended) == (streams if setup.sees_client else 0), app_log[-4000:]
    assert all(line.startswith(f"{STREAM_GONE} GET /stream: ") for line in ended)


def test_borrowed_uwsgi_descriptor_is_never_closed_by_the_probe() -> None:
    """``close()``, ``with`` and garbage collection leave uWSGI's descriptor open."""
    import gc
    import os
    import socket

    from flask_reqconn.probes import SocketProbe, uwsgi
    from flask_reqconn.probes.uwsgi import BorrowedSocket

    ours, peer = socket.socketpair()
    with ours, peer:
        fd = ours.fileno()
        BorrowedSocket(fd).close()
        with BorrowedSocket(fd):
            pass
        cycle: list[Any] = [SocketProbe(BorrowedSocket(fd))]
        cycle.append(cycle)
        del cycle
        gc.collect()
        os.fstat(fd)  # still open
        probe = SocketProbe(BorrowedSocket(fd))
        assert probe.watchable and not probe.gone()
        peer.close()
        assert probe.gone() and not probe.gone(eof_means_gone=False)
        assert uwsgi.client_socket({}) is None  # not under uWSGI: nothing imported
