"""flask-reqconn behind a real pgbouncer in transaction pooling mode.

The core lifecycle and an abort storm run through pgbouncer; pgbouncer's own
``SHOW POOLS`` / ``SHOW CLIENTS`` are the second witness that no server
connection stays held.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask, Response, stream_with_context

from flask_reqconn import get_conn, state_of
from flask_reqconn.storm import StormConfig, run_storm
from tests import pg, servers
from tests.appfixtures import AppFactory, reqconn_of
from tests.fix_pgbouncer import PgBouncer

pytestmark = pytest.mark.slow


@pytest.fixture
def bouncer(make_pgbouncer: Callable[..., PgBouncer]) -> PgBouncer:
    """A pgbouncer of the test's own (so its SHOW output is ours alone)."""
    return make_pgbouncer(default_pool_size=3)


def no_server_held(bouncer: PgBouncer) -> bool:
    """pgbouncer has no server connection linked to a client (no open transaction)."""
    pools = bouncer.show("POOLS")
    return all(int(p["sv_active"]) == 0 and int(p["cl_waiting"]) == 0 for p in pools)


def bouncer_app(make_app: AppFactory, bouncer: PgBouncer, **config: Any) -> Flask:
    app = make_app(pgbouncer=True, **config)
    app.config["REQCONN_CONNINFO"] = bouncer.dsn
    state = state_of(app)
    import dataclasses

    holder = state.pools["default"]
    holder.settings = dataclasses.replace(holder.settings, conninfo=bouncer.dsn)
    return app


def test_pgbouncer_setting_disables_prepared_statements_and_refuses_options(
    make_app: AppFactory,
) -> None:
    from flask_reqconn import ConfigError

    app = make_app(pgbouncer=True)
    assert state_of(app).pools["default"].settings.connect_args["prepare_threshold"] is None
    with pytest.raises(ConfigError, match="REQCONN_SESSION_SETTINGS: cannot be sent through"):
        make_app(pgbouncer=True, session_settings={"statement_timeout": "5s"})


def test_core_lifecycle_through_pgbouncer(make_app: AppFactory, bouncer: PgBouncer) -> None:
    app = bouncer_app(make_app, bouncer, max_size=2, timeout=0.5)

    @app.get("/q")
    def q() -> str:
        conn = get_conn()
        # the same statement many times: would be prepared without REQCONN_PGBOUNCER
        for _ in range(8):
            conn.execute("select %s::int", (1,))
        return "ok"

    @app.get("/boom")
    def boom() -> str:
        get_conn().execute("select 1")
        raise RuntimeError("boom")

    @app.get("/stream")
    def stream() -> Response:
        @stream_with_context
        def rows() -> Iterator[str]:
            for i in range(3):
                yield f"{get_conn().execute('select %s::int', (i,)).fetchone()[0]}\n"

        return Response(rows())

    @app.get("/slow")
    def slow() -> str:
        get_conn().execute("select pg_sleep(1)")
        return "ok"

    client = app.test_client()
    for _ in range(10):
        assert client.get("/q").status_code == 200
    assert client.get("/boom").status_code == 500
    response = client.get("/stream")
    assert response.data == b"0\n1\n2\n"
    response.close()
    codes: list[int] = []
    threads = [threading.Thread(target=lambda: codes.append(app.test_client().get("/slow")
                                                           .status_code)) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert sorted(set(codes)) == [200, 503]
    s = reqconn_of(app).stats(app)
    assert s["checked_out"] == 0
    pg.wait_until(lambda: no_server_held(bouncer), timeout=20, message="pgbouncer idle")


def test_storm_through_pgbouncer_leaves_no_server_connection_held(
    spawn: Any, bouncer: PgBouncer
) -> None:
    appname = pg.unique_name("bouncer")
    server = spawn(
        "gunicorn", "tests.apps.reqconn_app:create_app()", worker_class="gthread", threads=8,
        env={"RC_DSN": bouncer.dsn, "RC_APPNAME": appname, "RC_MAX_SIZE": "2",
             "RC_PGBOUNCER": "1", "RC_TIMEOUT": "5"},
    )  # fmt: skip
    result = run_storm(
        StormConfig(
            server.url + "/slow?s=0.05",
            normal_count=60, normal_concurrency=8,
            abort_count=80, abort_concurrency=16,
            stream_path="/stream?n=20&s=0.02",
            final_count=30, final_concurrency=8,
            stats_url=server.url + "/_stats",
            drain_timeout=30, max_seconds=180,
        )  # fmt: skip
    )
    assert result.ok, result.verdict
    pg.wait_until(lambda: no_server_held(bouncer), timeout=30, message="pgbouncer idle")
    clients = bouncer.show("CLIENTS")
    assert all(c["state"] != "waiting" for c in clients)
    status, _, body = servers.http_get(server.url + "/")
    assert (status, body) == (200, b"1")


def test_pgbouncer_sees_our_pool_as_its_clients(
    make_app: AppFactory, bouncer: PgBouncer
) -> None:
    app = bouncer_app(make_app, bouncer, max_size=2, min_size=2)

    @app.get("/")
    def index() -> str:
        return str(get_conn().execute("select 1").fetchone()[0])

    assert app.test_client().get("/").status_code == 200

    def ours() -> list[dict[str, Any]]:
        # this pgbouncer is the test's own: every client but the admin console is ours
        return [c for c in bouncer.show("CLIENTS") if c["database"] != "pgbouncer"]

    pg.wait_until(lambda: len(ours()) == 2, timeout=20,
                  message="both pool connections are pgbouncer clients")  # fmt: skip
    assert no_server_held(bouncer)
    reqconn_of(app).close(app)
    pg.wait_until(lambda: not ours(), timeout=20,
                  message="closing the pool disconnects from pgbouncer")  # fmt: skip
