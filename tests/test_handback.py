"""A connection goes back idle and without the previous request's session state."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import psycopg
import pytest
from flask import Flask
from psycopg.rows import class_row, dict_row, namedtuple_row

from flask_reqconn import get_conn
from tests import pg
from tests.appfixtures import AppFactory, reqconn_of


def stats(app: Flask) -> dict[str, Any]:
    return reqconn_of(app).stats(app)


@pytest.fixture
def table(pg_dsn: str) -> str:
    name = pg.unique_name("t")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"create table {name} (id serial primary key, v text)")
    return name


def count(pg_dsn: str, table: str) -> int:
    with psycopg.connect(pg_dsn) as conn:
        return int(conn.execute(f"select count(*) from {table}").fetchone()[0])


def test_session_state_of_one_request_is_invisible_to_the_next(
    make_app: AppFactory, pg_dsn: str
) -> None:
    app = make_app(max_size=1)
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        role = pg.unique_name("role")
        admin.execute(f"create role {role}")

    @app.get("/dirty")
    def dirty() -> str:
        conn = get_conn()
        conn.execute("set search_path = pg_catalog")
        conn.execute("select set_config('reqconn.secret', 'tenant-42', false)")
        conn.execute(f"set role {role}")
        conn.execute("set statement_timeout = '123s'")
        conn.execute("select pg_advisory_lock(4242)")
        conn.execute("listen reqconn_channel")
        conn.commit()  # session settings survive a commit: only a reset removes them
        conn.execute("set application_name = 'changed'")
        conn.commit()
        conn.autocommit = True
        conn.execute("create temp table scratch (x int)")
        conn.read_only = True
        conn.row_factory = dict_row
        return str(conn.info.backend_pid)

    @app.get("/look")
    def look() -> dict[str, Any]:
        conn = get_conn()
        row = conn.execute(
            """select pg_backend_pid(), current_setting('search_path'),
                      coalesce(current_setting('reqconn.secret', true), ''),
                      current_user = session_user, current_setting('statement_timeout'),
                      (select count(*) from pg_locks where locktype = 'advisory'
                        and pid = pg_backend_pid()),
                      (select count(*) from pg_listening_channels()),
                      to_regclass('pg_temp.scratch') is null,
                      current_setting('application_name')"""
        ).fetchone()
        return {
            "pid": row[0],
            "search_path": row[1],
            "secret": row[2],
            "role_reset": row[3],
            "statement_timeout": row[4],
            "advisory_locks": row[5],
            "listening": row[6],
            "temp_gone": row[7],
            "application_name": row[8],
            "autocommit": conn.autocommit,
            "read_only": conn.read_only,
            "tuple_rows": isinstance(row, tuple),
        }

    client = app.test_client()
    pid = int(client.get("/dirty").data)
    seen = client.get("/look").get_json()
    assert seen["pid"] == pid  # same connection (max_size=1), yet clean
    assert seen == {
        "pid": pid,
        "search_path": '"$user", public',
        "secret": "",
        "role_reset": True,
        "statement_timeout": "0",
        "advisory_locks": 0,
        "listening": 0,
        "temp_gone": True,
        "application_name": app.config["TEST_APPNAME"],
        "autocommit": False,
        "read_only": None,
        "tuple_rows": True,
    }


def test_startup_session_settings_survive_the_reset(make_app: AppFactory) -> None:
    app = make_app(max_size=1, session_settings={"statement_timeout": "7s"})

    @app.get("/")
    def show() -> str:
        conn = get_conn()
        conn.execute("set statement_timeout = '1s'")
        conn.commit()
        return str(conn.execute("show statement_timeout").fetchone()[0])

    client = app.test_client()
    assert client.get("/").data == b"1s"
    with app.app_context(), reqconn_of(app).connection() as conn:
        assert conn.execute("show statement_timeout").fetchone()[0] == "7s"


def test_uncommitted_writes_are_rolled_back_with_a_warning(
    make_app: AppFactory, table: str, pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()

    @app.post("/write")
    def write() -> str:
        get_conn().execute(f"insert into {table} (v) values ('x')")
        return "forgot to commit"

    @app.get("/read")
    def read() -> str:
        return str(get_conn().execute(f"select count(*) from {table}").fetchone()[0])

    with caplog.at_level("WARNING", logger="flask_reqconn"):
        assert app.test_client().post("/write").status_code == 200
        assert app.test_client().get("/read").data == b"0"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "uncommitted writes" in warnings[0] and "POST /write" in warnings[0]
    assert count(pg_dsn, table) == 0
    assert stats(app)["discarded_writes"] == 1


def test_committed_writes_stay(make_app: AppFactory, table: str, pg_dsn: str) -> None:
    app = make_app()

    @app.post("/write")
    def write() -> str:
        conn = get_conn()
        conn.execute(f"insert into {table} (v) values ('x')")
        conn.commit()
        return "ok"

    assert app.test_client().post("/write").status_code == 200
    assert count(pg_dsn, table) == 1


def test_autocommit_mode(make_app: AppFactory, table: str, pg_dsn: str) -> None:
    app = make_app(transaction="autocommit", max_size=1)

    @app.post("/write")
    def write() -> str:
        conn = get_conn()
        assert conn.autocommit
        conn.execute(f"insert into {table} (v) values ('x')")
        conn.autocommit = False  # restored at hand-back
        return "ok"

    @app.get("/mode")
    def mode() -> str:
        return str(get_conn().autocommit)

    client = app.test_client()
    assert client.post("/write").status_code == 200
    assert count(pg_dsn, table) == 1
    assert client.get("/mode").data == b"True"


def atomic_app(make_app: AppFactory, table: str) -> Flask:
    app = make_app(transaction="atomic")

    @app.post("/ok")
    def ok() -> str:
        get_conn().execute(f"insert into {table} (v) values ('ok')")
        return "saved"

    @app.post("/fail")
    def fail() -> str:
        get_conn().execute(f"insert into {table} (v) values ('fail')")
        raise RuntimeError("boom")

    @app.post("/bad-request")
    def bad_request() -> tuple[str, int]:
        get_conn().execute(f"insert into {table} (v) values ('400')")
        return "nope", 400

    @app.post("/swallowed-error")
    def swallowed() -> str:
        conn = get_conn()
        conn.execute(f"insert into {table} (v) values ('lost')")
        try:
            conn.execute("select 1/0")
        except psycopg.errors.DivisionByZero:
            pass
        return "looks fine"

    @app.post("/commit-fails")
    def commit_fails() -> str:
        conn = get_conn()
        conn.execute(
            f"create temp table child (parent int references {table} (id)"
            " deferrable initially deferred)"
        )
        conn.execute("insert into child values (-1)")  # checked at commit
        return "looks fine"

    return app


def test_atomic_mode_commits_successful_requests(
    make_app: AppFactory, table: str, pg_dsn: str
) -> None:
    app = atomic_app(make_app, table)
    assert app.test_client().post("/ok").status_code == 200
    assert count(pg_dsn, table) == 1


@pytest.mark.parametrize(
    ("path", "status"),
    [("/fail", 500), ("/bad-request", 400), ("/swallowed-error", 500), ("/commit-fails", 500)],
)
def test_atomic_mode_never_loses_a_write_silently(
    make_app: AppFactory, table: str, pg_dsn: str, path: str, status: int
) -> None:
    app = atomic_app(make_app, table)
    assert app.test_client().post(path).status_code == status
    assert count(pg_dsn, table) == 0
    assert stats(app)["checked_out"] == 0


def test_connection_returned_mid_query_is_discarded(make_app: AppFactory, pg_admin: Any) -> None:
    app = make_app(max_size=1)

    @app.get("/busy")
    def busy() -> str:
        conn = get_conn()
        conn.pgconn.send_query(b"select pg_sleep(30)")  # still running at hand-back
        pid = conn.info.backend_pid
        # running for sure: a cancel that reaches the server before it has read
        # the query is ignored by PostgreSQL (a race of the test, not of the check)
        pg.wait_until(
            lambda: [s for s in pg.app_sessions(pg_admin, app.config["TEST_APPNAME"])
                     if s["pid"] == pid and s["state"] == "active"],
            timeout=15,
            message="the query runs",
        )  # fmt: skip
        return str(pid)

    @app.get("/pid")
    def pid() -> str:
        return str(get_conn().execute("select pg_backend_pid()").fetchone()[0])

    client = app.test_client()
    busy_pid = int(client.get("/busy").data)
    assert int(client.get("/pid").data) != busy_pid
    assert stats(app)["pools"]["default"]["discarded_connections"] == 1
    pg.wait_until(  # the query was cancelled, not left to run 30 s
        lambda: not [s for s in pg.app_sessions(pg_admin, app.config["TEST_APPNAME"])
                     if s["pid"] == busy_pid],
        timeout=15,
        message="the discarded backend goes away",
    )


def test_broken_connection_is_replaced(make_app: AppFactory, pg_admin: Any) -> None:
    app = make_app(max_size=1)

    @app.get("/die")
    def die() -> str:
        conn = get_conn()
        pg_admin.execute("select pg_terminate_backend(%s)", (conn.info.backend_pid,))
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
        return "ok"

    @app.get("/pid")
    def pid() -> str:
        return str(get_conn().execute("select pg_backend_pid()").fetchone()[0])

    client = app.test_client()
    assert client.get("/die").status_code == 200
    assert client.get("/pid").status_code == 200
    assert stats(app)["checked_out"] == 0


def test_reset_can_be_disabled(make_app: AppFactory) -> None:
    app = make_app(max_size=1, reset_session=False)

    @app.get("/set")
    def set_it() -> str:
        conn = get_conn()
        conn.execute("set search_path = pg_catalog")
        conn.commit()
        return "ok"

    @app.get("/show")
    def show() -> str:
        return str(get_conn().execute("show search_path").fetchone()[0])

    client = app.test_client()
    client.get("/set")
    assert client.get("/show").data == b"pg_catalog"


def test_connection_for_scripts_is_committed_and_reset(
    make_app: AppFactory, table: str, pg_dsn: str
) -> None:
    app = make_app(max_size=1)
    reqconn = reqconn_of(app)
    with reqconn.connection(app=app) as conn:
        conn.execute(f"insert into {table} (v) values ('script')")
        conn.execute("set search_path = pg_catalog")
        pid = conn.info.backend_pid
    assert count(pg_dsn, table) == 1  # committed on success
    with pytest.raises(RuntimeError), reqconn.connection(app=app) as conn:
        conn.execute(f"insert into {table} (v) values ('failed')")
        raise RuntimeError("boom")
    assert count(pg_dsn, table) == 1  # rolled back on error
    with reqconn.connection(app=app) as conn:
        assert conn.info.backend_pid == pid
        assert conn.execute("show search_path").fetchone()[0] == '"$user", public'


# -- row factories (issue 11, point 8) ----------------------------------------------


@dataclasses.dataclass
class PidRow:
    pid: int


ROW_FACTORIES = {
    "dict_row": dict_row,
    "namedtuple_row": namedtuple_row,
    "class_row": class_row(PidRow),
}


def backend_pid_of(row: Any) -> int:
    if isinstance(row, dict):
        return int(row["pid"])
    return int(row.pid)


@pytest.mark.parametrize("factory", sorted(ROW_FACTORIES))
@pytest.mark.parametrize("where", ["config", "view"])
def test_a_row_factory_does_not_break_the_hand_back_of_an_open_transaction(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture, factory: str, where: str
) -> None:
    row_factory = ROW_FACTORIES[factory]
    config = {"connect_args": {"row_factory": row_factory}} if where == "config" else {}
    app = make_app(max_size=1, **config)

    @app.get("/pid")
    def pid() -> str:
        conn = get_conn()
        if where == "view":
            conn.row_factory = row_factory
        # a transaction is open at hand-back: the write check runs and reads a row
        row = conn.execute("select pg_backend_pid() as pid").fetchone()
        return str(backend_pid_of(row))

    with caplog.at_level("WARNING", logger="flask_reqconn"):
        client = app.test_client()
        first = client.get("/pid")
        second = client.get("/pid")
    assert first.status_code == second.status_code == 200
    assert first.data == second.data  # the same connection, reused, not replaced
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    s = stats(app)
    assert s["discarded_connections"] == 0 and s["discarded_writes"] == 0


def test_the_write_check_still_sees_writes_with_a_dict_row_factory(
    make_app: AppFactory, table: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(max_size=1, connect_args={"row_factory": dict_row})

    @app.post("/write")
    def write() -> str:
        get_conn().execute(f"insert into {table} (v) values ('lost')")
        return "ok"

    with caplog.at_level("WARNING", logger="flask_reqconn"):
        assert app.test_client().post("/write").status_code == 200
    assert stats(app)["discarded_writes"] == 1
    assert any("rolled back uncommitted writes" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("reset_session", [True, False])
def test_a_hand_back_statement_that_fails_discards_the_connection(
    make_app: AppFactory,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    reset_session: bool,
) -> None:
    """The hand-back goes to libpq directly: an error in any of its statements (here one
    added to it) still discards the connection, and the next request gets a clean one."""
    from flask_reqconn import connection

    failing = {key: sql + b"; SELECT 1/0" for key, sql in connection._SQL.items()}
    monkeypatch.setattr(connection, "_SQL", failing)
    app = make_app(max_size=1, reset_session=reset_session)

    @app.get("/pid")
    def pid() -> str:
        return str(get_conn().execute("select pg_backend_pid()").fetchone()[0])

    client = app.test_client()
    with caplog.at_level("WARNING", logger="flask_reqconn"):
        first = client.get("/pid")
    assert first.status_code == 200
    assert stats(app)["discarded_connections"] == 1
    assert any("division by zero" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    second = client.get("/pid")
    assert second.status_code == 200 and second.data != first.data
    assert stats(app)["discarded_connections"] == 1


def test_a_connection_left_in_pipeline_mode_is_discarded(make_app: AppFactory) -> None:
    """libpq refuses a simple query in pipeline mode: the connection is replaced."""
    app = make_app(max_size=1)

    @app.get("/pipeline")
    def pipeline() -> str:
        conn = get_conn()
        conn.execute("select 1")
        conn.pgconn.enter_pipeline_mode()  # and never left
        return str(conn.info.backend_pid)

    @app.get("/pid")
    def pid() -> str:
        return str(get_conn().execute("select pg_backend_pid()").fetchone()[0])

    client = app.test_client()
    left = client.get("/pipeline").data
    assert client.get("/pid").data != left
    assert stats(app)["discarded_connections"] == 1


def test_the_write_check_reads_its_own_result_not_the_views(
    make_app: AppFactory, table: str
) -> None:
    """A view whose last statement returned rows (true or false) does not decide the check."""
    app = make_app(max_size=1)

    @app.get("/true")
    def true_() -> str:
        get_conn().execute("select true")
        return "ok"

    @app.post("/write")
    def write() -> str:
        get_conn().execute(f"insert into {table} (v) values ('lost')")
        get_conn().execute("select false")
        return "ok"

    client = app.test_client()
    assert client.get("/true").status_code == 200
    assert stats(app)["discarded_writes"] == 0
    assert client.post("/write").status_code == 200
    assert stats(app)["discarded_writes"] == 1


@pytest.mark.parametrize("reset_session", [True, False])
def test_a_failed_transaction_is_rolled_back_and_the_connection_reused(
    make_app: AppFactory, table: str, reset_session: bool
) -> None:
    """A view that swallowed a failed statement leaves the transaction in error: the
    hand-back rolls it back (and resets the session) and the connection is reused."""
    app = make_app(max_size=1, reset_session=reset_session)

    @app.get("/fail")
    def fail() -> str:
        conn = get_conn()
        conn.execute("set search_path = pg_catalog")
        try:
            conn.execute("select 1/0")
        except psycopg.errors.DivisionByZero:
            pass
        return str(conn.info.backend_pid)

    @app.get("/check")
    def check() -> dict[str, Any]:
        conn = get_conn()
        path = conn.execute("select current_setting('search_path')").fetchone()[0]
        return {"pid": conn.info.backend_pid, "path": path}

    client = app.test_client()
    pid = int(client.get("/fail").data)
    seen = client.get("/check").get_json()
    assert seen["pid"] == pid  # reused, not discarded
    assert seen["path"] != "pg_catalog"  # the failed transaction's SET was rolled back
    assert stats(app)["discarded_connections"] == 0


def test_notifications_that_arrive_at_the_hand_back_go_to_the_request_s_handlers(
    make_app: AppFactory, pg_admin: Any
) -> None:
    """A notification that libpq reads during the hand-back goes to the connection's
    handlers there and then, as psycopg would send it; none is left in libpq for the
    next borrower, and the LISTEN does not outlive the request."""
    app = make_app(max_size=1)
    channel = pg.unique_name("ch")
    got: list[str] = []

    @app.get("/listen")
    def listen() -> str:
        conn = get_conn()
        conn.add_notify_handler(lambda n: got.append(n.payload))
        conn.execute(f"listen {channel}")
        conn.commit()  # idle now: the server sends notifications at once
        pg_admin.execute(f"notify {channel}, 'at hand-back'")
        time.sleep(0.2)  # in the socket, unread, when the hand-back runs
        return "ok"

    @app.get("/next")
    def next_() -> dict[str, Any]:
        conn = get_conn()
        left = conn.pgconn.notifies()
        listening = conn.execute("select count(*) from pg_listening_channels()").fetchone()[0]
        return {"left": left is not None, "listening": listening}

    client = app.test_client()
    assert client.get("/listen").status_code == 200
    assert got == ["at hand-back"]
    pg_admin.execute(f"notify {channel}, 'after'")
    time.sleep(0.2)
    assert client.get("/next").get_json() == {"left": False, "listening": 0}
    assert got == ["at hand-back"]


def test_the_psycopg_internals_the_hand_back_builds_on_have_their_shape(pg_dsn: str) -> None:
    """``flask_reqconn.connection`` sends its hand-back's SQL through these psycopg internals (a
    measured gain, see the performance page). If a release changes one, the hand-back
    would fail on every request and discard every connection: fail here first, before
    the upper bound on psycopg in pyproject.toml is raised."""
    import inspect

    from psycopg import generators, waiting

    from flask_reqconn import connection

    if psycopg.pq.__impl__ in ("c", "binary"):
        # psycopg's own wait in C: the hand-back's PQexec path is taken where it is used
        assert callable(waiting.wait_c) and connection._WAIT_C is waiting.wait_c
    inspect.signature(generators.execute).bind("pgconn")  # TypeError if not
    with psycopg.connect(pg_dsn) as conn:
        assert callable(conn.pgconn.exec_) and callable(conn.pgconn.send_query)
        conn.execute("select 1")
        clear = conn._prepared.clear  # what connection._forget_prepared calls
        assert callable(clear)
        inspect.signature(clear).bind()
