"""The Flask-SQLAlchemy app on flask-reqconn under real gunicorn, and its control.

tests/apps/fsqla_app.py is served twice where a comparison is made: ``FSQLA_MODE=reqconn``
(flask-reqconn's pool under the engine) and ``FSQLA_MODE=native`` (Flask-SQLAlchemy's own
``QueuePool``, same size). Real sockets, a real PostgreSQL, ``pg_stat_activity``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from flask_reqconn.storm import StormConfig, StormResult, format_report, run_storm
from tests import pg, servers
from tests.appfixtures import MATRIX_STORM as STORM

pytestmark = pytest.mark.slow

APP = "tests.apps.fsqla_app:create_app()"
POOL_SIZE = 2
Spawn = Callable[..., servers.ServerProcess]

WORKERS = [
    pytest.param({"worker_class": "sync"}, id="sync"),
    pytest.param({"worker_class": "gthread", "threads": 8}, id="gthread-8-threads"),
]


@pytest.fixture
def table(pg_admin: psycopg.Connection[Any]) -> Iterator[str]:
    name = pg.unique_name("fsqla_items")
    ident = sql.Identifier(name)
    pg_admin.execute(
        sql.SQL("CREATE TABLE {} (id serial PRIMARY KEY, name text UNIQUE NOT NULL)").format(ident)
    )
    pg_admin.execute(
        sql.SQL("INSERT INTO {} (name) SELECT 'item ' || n FROM generate_series(1, 20) n").format(
            ident
        )
    )
    try:
        yield name
    finally:
        pg_admin.execute(sql.SQL("DROP TABLE {}").format(ident))


def serve(spawn: Spawn, pg_dsn: str, table: str, mode: str, *, timeout: float = 5,
          **options: Any) -> tuple[servers.ServerProcess, str]:  # fmt: skip
    appname = pg.unique_name(f"fsqla_{mode}")
    env = {"FSQLA_DSN": pg_dsn, "FSQLA_MODE": mode, "FSQLA_TABLE": table,
           "FSQLA_APPNAME": appname, "FSQLA_POOL_SIZE": str(POOL_SIZE),
           "FSQLA_TIMEOUT": str(timeout)}  # fmt: skip
    return spawn("gunicorn", APP, env=env, **options), appname


def stats(server: servers.ServerProcess) -> dict[str, Any]:
    status, _, body = servers.http_get(server.url + "/stats")
    assert status == 200, body[:300]
    data: dict[str, Any] = json.loads(body)
    return data


def sleeping(admin: psycopg.Connection[Any], appname: str) -> list[dict[str, Any]]:
    return [s for s in pg.app_sessions(admin, appname)
            if s["state"] == "active" and "pg_sleep" in s["query"]]  # fmt: skip


def settled(server: servers.ServerProcess, admin: psycopg.Connection[Any], appname: str
            ) -> dict[str, Any]:  # fmt: skip
    final = pg.wait_until(lambda: (s := stats(server))["checked_out"] == 0 and s, timeout=60,
                          message="every connection back")  # fmt: skip
    pg.wait_until(lambda: all(s["state"] == "idle" for s in pg.app_sessions(admin, appname)),
                  timeout=60, message="no busy session of the app")  # fmt: skip
    assert servers.http_get(server.url + "/")[0] == 200
    return final  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", WORKERS)
def test_dropped_orm_stream_gets_its_query_cancelled_and_its_connection_back(
    spawn: Spawn, pg_dsn: str, pg_admin: psycopg.Connection[Any], table: str,
    kind: dict[str, Any],
) -> None:  # fmt: skip
    server, appname = serve(spawn, pg_dsn, table, "reqconn", **kind)
    status, body = servers.read_first_chunk_and_drop(server.url, "/sleepfeed")
    dropped = time.monotonic()
    assert status == 200 and b"started" in body
    pg.wait_until(lambda: not sleeping(pg_admin, appname), timeout=15,
                  message="the stream's pg_sleep(30) was cancelled")  # fmt: skip
    final = settled(server, pg_admin, appname)
    assert time.monotonic() - dropped < 20  # back long before pg_sleep(30) could end
    assert final["cancelled"] == 1
    assert final["releases"]["abort"] == 1
    assert final["releases"]["finalizer"] == 0


def burst(url: str, n: int) -> list[tuple[int, float, str | None]]:
    """*n* concurrent GETs; (status, seconds, Retry-After) of each."""
    results: list[tuple[int, float, str | None]] = []
    lock = threading.Lock()

    def one() -> None:
        began = time.monotonic()
        try:
            status, headers, _ = servers.http_get(url, timeout=60)
        except OSError:
            status, headers = 0, {}
        with lock:
            results.append((status, time.monotonic() - began, headers.get("retry-after")))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert len(results) == n, "client threads hung"
    return results


def test_burst_into_a_pool_of_two_gets_quick_503s_and_the_control_hangs(
    spawn: Spawn, pg_dsn: str, pg_admin: psycopg.Connection[Any], table: str
) -> None:
    options: dict[str, Any] = {"worker_class": "gthread", "threads": 24}
    ours, ours_name = serve(spawn, pg_dsn, table, "reqconn", timeout=0.5, **options)
    native, native_name = serve(spawn, pg_dsn, table, "native", timeout=5, **options)

    got = burst(ours.url + "/slow?s=2", 20)
    statuses = sorted(status for status, _, _ in got)
    assert statuses == [200] * 2 + [503] * 18, got
    assert all(secs < 3 and retry == "1" for status, secs, retry in got if status == 503), got
    settled(ours, pg_admin, ours_name)

    # The same burst on Flask-SQLAlchemy's own QueuePool: requests wait pool_timeout (5 s)
    # in line, two at a time, and those still waiting then fail with a 500.
    got = burst(native.url + "/slow?s=2", 20)
    by_status: dict[int, list[float]] = {}
    for status, secs, _ in got:
        by_status.setdefault(status, []).append(secs)
    print({status: (len(v), round(max(v), 1)) for status, v in by_status.items()})
    assert 503 not in by_status, got
    assert len(by_status.get(200, [])) >= 4, got
    assert len(by_status.get(500, [])) >= 10, got
    assert min(by_status[500]) >= 4.5, got  # each failure hung for the whole pool_timeout
    settled(native, pg_admin, native_name)




def storm(server: servers.ServerProcess, pg_dsn: str, appname: str) -> StormResult:
    return run_storm(
        StormConfig(server.url + "/", dsn=pg_dsn, application_name=appname, **STORM)
    )


@pytest.mark.parametrize("kind", WORKERS)
def test_abort_storm_on_flask_sqlalchemy_side_by_side_with_its_own_pool(
    spawn: Spawn, pg_dsn: str, pg_admin: psycopg.Connection[Any], table: str,
    kind: dict[str, Any],
) -> None:  # fmt: skip
    ours, ours_name = serve(spawn, pg_dsn, table, "reqconn", **kind)
    native, native_name = serve(spawn, pg_dsn, table, "native", **kind)

    result = storm(ours, pg_dsn, ours_name)
    control = storm(native, pg_dsn, native_name)
    report, control_report = format_report(result), format_report(control)
    print(f"\nflask-reqconn {kind}\n{report}\nFlask-SQLAlchemy's QueuePool {kind}\n"
          f"{control_report}")  # fmt: skip

    assert result.ok, report
    assert result.abort.errors == {}, report
    assert sorted((r.source, r.after_drain, r.at_end) for r in result.leaks) == [
        ("pg", 0, 0),
        ("stats", 0, 0),
    ], report
    final = settled(ours, pg_admin, ours_name)
    assert final["releases"]["finalizer"] == 0
    assert sum(final["releases"].values()) == final["checkouts"]
    assert final["client_gone"] > 0  # aborted requests skipped before their view ran
    assert len(pg.app_sessions(pg_admin, ours_name)) <= POOL_SIZE

    # The control, for the record: what its own pool does with the same storm.
    control_final = settled(native, pg_admin, native_name)
    ours_views = final["views"].get("index", 0) + final["views"].get("feed", 0)
    native_views = control_final["views"].get("index", 0) + control_final["views"].get("feed", 0)
    print({"reqconn views run": final["views"], "native views run": control_final["views"],
           "control leaks": [(r.source, r.after_drain, r.at_end) for r in control.leaks]})
    # Flask-SQLAlchemy's scoped session is removed at teardown and SQLAlchemy's pool
    # takes a connection back when its last reference goes: the control leaks nothing
    # here either. What it lacks is skipping work for clients that left: every aborted
    # request still ran its view.
    assert control_final["checked_out"] == 0
    assert native_views > ours_views, (native_views, ours_views)


@pytest.mark.parametrize("kind", WORKERS)
def test_orm_stream_whose_connection_is_lost_is_cut_off_quietly(
    spawn: Spawn, pg_dsn: str, pg_admin: psycopg.Connection[Any], table: str,
    kind: dict[str, Any],
) -> None:  # fmt: skip
    """The backend killed under ``db.session.execute`` after the stream's first line: the
    integration's DatabaseUnavailable is counted by the WSGI wrapper, which cuts the
    stream off (the status line is sent) without a traceback."""
    server, appname = serve(spawn, pg_dsn, table, "reqconn", **kind)
    assert servers.http_get(server.url + "/")[0] == 200

    def kill() -> None:
        pg.wait_until(lambda: sleeping(pg_admin, appname), timeout=30, message="pg_sleep")
        pg_admin.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
                         " WHERE application_name = %s AND state = 'active'", (appname,))

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    with pytest.raises(ValueError, match="truncated chunked body"):  # no last chunk
        servers.http_get(server.url + "/sleepfeed", timeout=60)
    killer.join()
    final = settled(server, pg_admin, appname)
    assert final["connection_lost"] == 1 and final["discarded_connections"] == 1, final
    log = server.log_text()
    assert "Traceback" not in log and "Error handling request" not in log, server.log_tail()
    assert log.count("lost during GET /sleepfeed: its streamed response was cut off") == 1, (
        server.log_tail()
    )
