"""The server matrix: the example app under every WSGI server we document, hit by the storm.

Real server subprocesses, real sockets, a real PostgreSQL. Each server serves
``examples/reqconn_app.py`` with a pool of 2 and gets the abort storm of
:mod:`flask_reqconn.storm` (normal load; clients that close at once, after 1 ms, with a
reset, and that drop the ``/feed`` stream after its first line; a health check; a final
load), with both leak oracles: the app's ``/stats`` and ``pg_stat_activity``.

``examples/naive_app.py`` gets the same storm under gunicorn and must fail it: that is
what keeps ``python -m examples.demo`` honest.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest

from flask_reqconn.storm import StormConfig, StormResult, format_report, run_storm
from tests import pg, servers
from tests.appfixtures import MATRIX_STORM as STORM

pytestmark = pytest.mark.slow

POOL_SIZE = 2
REQCONN_APP = "examples.reqconn_app"
NAIVE_APP = "examples.naive_app"

Spawn = Callable[..., servers.ServerProcess]


def serve(
    spawn: Spawn,
    kind: str,
    module: str,
    appname: str,
    pg_dsn: str,
    options: dict[str, Any],
    env: dict[str, str] | None = None,
) -> servers.ServerProcess:
    """Serve ``module``'s ``create_app`` with the server ``kind``."""
    env = {
        "DATABASE_URL": pg.with_conninfo(pg_dsn, application_name=appname),
        "POOL_SIZE": str(POOL_SIZE),
        **(env or {}),
    }
    spec = f"{module}:create_app()" if kind == "gunicorn" else f"{module}:create_app"
    return spawn(kind, spec, env=env, **options)


def storm(
    server: servers.ServerProcess, pg_dsn: str, appname: str, **overrides: Any
) -> StormResult:
    config = StormConfig(
        server.url + "/", dsn=pg_dsn, application_name=appname, **{**STORM, **overrides}
    )
    return run_storm(config)


def get_stats(server: servers.ServerProcess, timeout: float = 10) -> dict[str, Any]:
    status, _, body = servers.http_get(server.url + "/stats", timeout=timeout)
    assert status == 200, (status, body[:300])
    data: dict[str, Any] = json.loads(body)
    return data


SERVERS = [
    pytest.param("gunicorn", {"worker_class": "sync"}, id="gunicorn-sync"),
    pytest.param(
        "gunicorn", {"worker_class": "gthread", "threads": 8}, id="gunicorn-gthread-8-threads"
    ),
    pytest.param("gunicorn", {"worker_class": "gevent"}, id="gunicorn-gevent"),
    pytest.param("werkzeug_dev", {}, id="werkzeug-dev"),
    pytest.param("waitress", {"threads": 4}, id="waitress"),
    pytest.param(
        "waitress",
        {"threads": 4, "extra_args": ["--channel-request-lookahead=5"]},
        id="waitress-lookahead",
    ),
]


@pytest.mark.parametrize(("kind", "options"), SERVERS)
def test_example_app_survives_the_storm_with_nothing_leaked(
    spawn: Spawn, pg_dsn: str, pg_admin: Any, kind: str, options: dict[str, Any]
) -> None:
    appname = pg.unique_name("matrix")
    server = serve(spawn, kind, REQCONN_APP, appname, pg_dsn, options)

    result = storm(server, pg_dsn, appname)

    report = format_report(result)
    print(f"\n{server.name} {options}\n{report}")
    assert result.ok, report
    assert result.abort.styles == {"close": 8, "delay": 8, "rst": 8, "stream": 8}, report
    assert result.abort.aborted == 32 and result.abort.errors == {}, report
    assert result.abort.statuses == {200: 8}, report  # every stream started, then dropped
    assert sorted((r.source, r.after_drain, r.at_end) for r in result.leaks) == [
        ("pg", 0, 0),
        ("stats", 0, 0),
    ], report

    # The pool's own view: every checkout came back, none through the last-resort finalizer,
    # and the pool holds all its connections again.
    stats = pg.wait_until(
        lambda: _pool_full(get_stats(server)), timeout=30, message="every connection back"
    )
    print({k: stats[k] for k in ("checkouts", "client_gone", "releases")})
    assert stats["checked_out"] == 0
    assert sum(stats["releases"].values()) == stats["checkouts"]
    assert stats["releases"]["finalizer"] == 0
    if kind == "waitress" and not options.get("extra_args"):
        # Without channel_request_lookahead waitress never reports a departed client:
        # every request, aborted or not, took a connection and ran its view.
        assert stats["client_gone"] == 0
        assert stats["checkouts"] == result.normal.requests + 32 + 1 + result.final.requests
    sessions = pg.app_sessions(pg_admin, appname)
    assert len(sessions) <= POOL_SIZE
    assert all(s["state"] == "idle" for s in sessions), sessions


def test_psycopg_cooperates_with_gevent_under_gunicorn(
    spawn: Spawn, pg_dsn: str, pg_admin: Any
) -> None:
    """psycopg >= 3.1.14 sees gevent's patched ``select`` and stops using ``wait_c``.

    With a blocking wait the worker's only thread would sit in the first ``pg_sleep``, and
    the second request could not even start its query.
    """
    appname = pg.unique_name("matrix_gevent")
    server = serve(
        spawn, "gunicorn", "tests.apps.matrix_app", appname, pg_dsn, {"worker_class": "gevent"}
    )
    status, _, body = servers.http_get(server.url + "/wait-func")
    assert status == 200 and body != b"wait_c", body

    results: list[int] = []
    sleepers = [
        threading.Thread(
            target=lambda: results.append(servers.http_get(server.url + "/sleep?s=3", 60)[0])
        )
        for _ in range(POOL_SIZE)
    ]
    for thread in sleepers:
        thread.start()
    pg.wait_until(
        lambda: _sleeping(pg_admin, appname) == POOL_SIZE,
        timeout=30,
        message="both pg_sleep queries running at once in the one gevent worker",
    )
    assert get_stats(server)["checked_out"] == POOL_SIZE  # the worker answers meanwhile
    for thread in sleepers:
        thread.join(60)
    assert results == [200] * POOL_SIZE


NAIVE_SERVERS = [
    pytest.param({"worker_class": "sync"}, id="gunicorn-sync"),
    pytest.param({"worker_class": "gthread", "threads": 8}, id="gunicorn-gthread-8-threads"),
]


@pytest.mark.parametrize("options", NAIVE_SERVERS)
def test_naive_example_really_leaks_under_gunicorn(
    spawn: Spawn, pg_dsn: str, pg_admin: Any, options: dict[str, Any]
) -> None:
    """The demo's "before" picture is real: dropped streams drain the naive app's pool."""
    appname = pg.unique_name("matrix_naive")
    # A short pool timeout only shortens the backlog of requests waiting for a connection.
    server = serve(
        spawn, "gunicorn", NAIVE_APP, appname, pg_dsn, options, env={"POOL_TIMEOUT": "1"}
    )

    result = storm(
        server,
        pg_dsn,
        appname,
        normal_count=10,
        abort_count=8,
        abort_timeout=3.0,
        drain_timeout=2.0,
        health_timeout=3.0,
        final_count=4,
        final_timeout=3.0,
    )

    report = format_report(result)
    print(f"\nnaive {options}\n{report}")
    assert not result.ok, report
    assert result.normal.all_ok, report  # it works until clients drop streams
    assert result.health.ok_count == 0, report
    assert result.final.ok_count == 0, report
    # Every connection of the pool is lost to a dropped stream, for good. The app answers
    # /stats (it takes no connection) once the requests queued behind the pool time out.
    stats: dict[str, Any] = pg.wait_until(
        lambda: _try_stats(server), timeout=90, message="the naive app answers /stats"
    )
    assert stats["checked_out"] == POOL_SIZE, stats
    assert stats["pool"]["pool_available"] == 0, stats
    # PostgreSQL does not see it: the lost connections were garbage-collected, which
    # closed their sessions, yet the pool still counts them and opens no replacement.
    assert [s for s in pg.app_sessions(pg_admin, appname) if s["state"] != "idle"] == []
    status, _, _ = servers.http_get(server.url + "/health", timeout=30)
    assert status == 500


def _sleeping(admin: Any, appname: str) -> int:
    """How many sessions of ``appname`` are running ``pg_sleep`` now."""
    sessions = pg.app_sessions(admin, appname)
    return sum(s["state"] == "active" and "pg_sleep" in s["query"] for s in sessions)


def _pool_full(stats: dict[str, Any]) -> dict[str, Any]:
    """``stats`` if the pool holds every connection it has opened, else ``{}``."""
    pool = stats["pools"]["default"]["pool"]
    return stats if pool["pool_available"] == pool["pool_size"] else {}


def _try_stats(server: servers.ServerProcess) -> dict[str, Any]:
    """``/stats``, or ``{}`` while the server does not answer it."""
    try:
        return get_stats(server, timeout=2)
    except OSError:
        return {}
