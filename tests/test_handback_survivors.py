"""What survives a rollback, and psycopg's prepared statements across the hand-back.

Each piece of session state is left once by a request that commits it and
once by a request whose transaction is rolled back at hand-back; the next
request on the same connection must not see it either way. psycopg's
prepared statements survive the rollback of a transaction that wrote
nothing, and are dropped when it wrote (DDL may have been undone).

Every test runs twice: with the hand-back in one ``PQexec`` (where psycopg waits
in C) and through psycopg's own wait (where it does not: gevent).
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg.waiting
import pytest
from flask import Flask

from flask_reqconn import connection, get_conn
from tests import pg
from tests.appfixtures import AppFactory

#: what a request leaves: (SQL that leaves it, SQL the next request runs: true if it is gone)
SURVIVORS: dict[str, tuple[str, str]] = {
    "set": (
        "set search_path = pg_catalog",
        "select current_setting('search_path') <> 'pg_catalog'",
    ),
    "set_config": (
        "select set_config('reqconn.tenant', '42', false)",
        "select coalesce(current_setting('reqconn.tenant', true), '') = ''",
    ),
    "set role": ("set role {role}", "select current_user = session_user"),
    "session authorization": (
        "set session authorization {role}",
        "select session_user::text = '{login}' and current_user::text = '{login}'",
    ),
    "advisory lock": (
        "select pg_advisory_lock(4243)",
        "select not exists (select from pg_locks where locktype = 'advisory'"
        " and pid = pg_backend_pid())",
    ),
    # txid_current() gives the transaction an ID, as a write does: the write check
    # fails before its pg_advisory_unlock_all() runs, and the reset follows it
    "advisory lock, after a write": (
        "select pg_advisory_lock(4244), txid_current()",
        "select not exists (select from pg_locks where locktype = 'advisory'"
        " and pid = pg_backend_pid())",
    ),
    "listen": ("listen reqconn_survivor", "select not exists (select pg_listening_channels())"),
    "temp table": (
        "create temp table survivor (x int)",
        "select to_regclass('pg_temp.survivor') is null",
    ),
    "with hold cursor": (
        "declare survivor cursor with hold for select 1",
        "select not exists (select from pg_cursors where name = 'survivor')",
    ),
    # lastval() raises until nextval() runs again in the session (checked in the view)
    "sequence currval": ("select nextval('{seq}')", ""),
}


@pytest.fixture(autouse=True, params=["PQexec", "psycopg's wait"])
def wait(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The hand-back's two ways to libpq; checks afterwards that the one meant was taken."""
    calls = [0]
    real = connection.generators.execute

    def execute(pgconn: Any) -> Any:
        calls[0] += 1
        return real(pgconn)

    monkeypatch.setattr(connection, "generators", types.SimpleNamespace(execute=execute))
    if request.param != "PQexec":
        monkeypatch.setattr(psycopg.waiting, "wait", psycopg.waiting.wait_selector)
    yield request.param
    assert (calls[0] == 0) == (request.param == "PQexec"), calls


@pytest.fixture
def objects(pg_dsn: str) -> dict[str, str]:
    role, seq = pg.unique_name("role"), pg.unique_name("seq")
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(f"create role {role}")
        admin.execute(f"create sequence {seq}")
        admin.execute(f"grant usage on sequence {seq} to public")
    return {"role": role, "seq": seq}


def lastval_gone(conn: psycopg.Connection[Any]) -> bool:
    try:
        with conn.transaction():
            conn.execute("select lastval()")
    except psycopg.errors.ObjectNotInPrerequisiteState:
        return True  # "lastval is not yet defined in this session"
    return False


@pytest.mark.parametrize("ending", ["committed", "rolled back"])
@pytest.mark.parametrize("what", sorted(SURVIVORS))
def test_session_state_is_gone_for_the_next_request(
    make_app: AppFactory, objects: dict[str, str], what: str, ending: str
) -> None:
    app = make_app(max_size=1)
    leave, check = SURVIVORS[what]

    @app.get("/leave")
    def leave_it() -> str:
        conn = get_conn()
        conn.execute(leave.format(**objects))
        if ending == "committed":
            conn.commit()
        return str(conn.info.backend_pid)

    @app.get("/check")
    def check_it() -> dict[str, Any]:
        conn = get_conn()
        if not check:
            gone = lastval_gone(conn)
        else:
            sql = check.format(login=conn.info.user, **objects)
            gone = bool(conn.execute(sql).fetchone()[0])
        return {"pid": conn.info.backend_pid, "gone": gone}

    client = app.test_client()
    pid = int(client.get("/leave").data)
    seen = client.get("/check").get_json()
    assert seen == {"pid": pid, "gone": True}


def psycopg_statements(conn: psycopg.Connection[Any]) -> int:
    """psycopg's own (protocol-level) prepared statements on the server."""
    row = conn.execute(
        "select count(*) from pg_prepared_statements where not from_sql", prepare=False
    ).fetchone()
    return int(row[0])


def prepared_app(make_app: AppFactory, table: str) -> Flask:
    app = make_app(max_size=1)

    @app.get("/repeat")
    def repeat() -> str:
        conn = get_conn()
        for _ in range(8):  # past psycopg's prepare_threshold (5)
            conn.execute(f"select count(*) from {table}").fetchone()
        return str(psycopg_statements(conn))

    @app.post("/write")
    def write() -> str:
        get_conn().execute(f"insert into {table} values (1)")
        return "forgot to commit"

    @app.get("/count")
    def count() -> str:
        conn = get_conn()
        conn.execute("select 1")  # psycopg flushes its DEALLOCATEs after a query
        return str(psycopg_statements(conn))

    return app


@pytest.fixture
def table(pg_dsn: str) -> str:
    name = pg.unique_name("t")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"create table {name} (x int)")
    return name


def test_prepared_statements_survive_a_request_that_wrote_nothing(
    make_app: AppFactory, table: str
) -> None:
    client = prepared_app(make_app, table).test_client()
    assert int(client.get("/repeat").data) >= 1
    assert int(client.get("/count").data) >= 1  # still prepared after the hand-back rollback


def test_prepared_statements_are_dropped_after_a_request_that_wrote(
    make_app: AppFactory, table: str
) -> None:
    client = prepared_app(make_app, table).test_client()
    assert int(client.get("/repeat").data) >= 1
    assert client.post("/write").status_code == 200  # rolled back, with a warning
    assert client.get("/count").data == b"0"  # psycopg sent DEALLOCATE ALL


def test_a_statement_prepared_on_a_rolled_back_table_is_not_reused(
    make_app: AppFactory,
) -> None:
    """DDL undone by the hand-back: the same query on a new table of that name works."""
    app = make_app(max_size=1)
    name = pg.unique_name("t")

    @app.get("/make/<columns>")
    def make(columns: str) -> str:
        conn = get_conn()
        conn.execute(f"create table {name} ({columns})")
        rows = [conn.execute(f"select * from {name}").fetchall() for _ in range(8)]
        cur = conn.execute(f"select * from {name}")
        return ",".join(d.name for d in cur.description or ()) + f" {len(rows)}"

    client = app.test_client()
    assert client.get("/make/a int").data == b"a 8"  # never committed
    assert client.get("/make/b text, c text").data == b"b,c 8"


#: session state committed, then undone by the request's open transaction: the
#: hand-back's rollback brings it back, so the reset must come after the rollback
UNDONE_IN_THE_OPEN_TRANSACTION: dict[str, tuple[str, str]] = {
    "set": ("set search_path = pg_catalog", "reset search_path"),
    "set role": ("set role {role}", "reset role"),
    "session authorization": (
        "set session authorization {role}",
        "set session authorization default",
    ),
}


@pytest.mark.parametrize("what", sorted(UNDONE_IN_THE_OPEN_TRANSACTION))
def test_state_undone_only_in_the_open_transaction_is_gone_for_the_next_request(
    make_app: AppFactory, objects: dict[str, str], what: str
) -> None:
    app = make_app(max_size=1)
    leave, undo = UNDONE_IN_THE_OPEN_TRANSACTION[what]
    check = SURVIVORS[what][1]

    @app.get("/leave")
    def leave_it() -> str:
        conn = get_conn()
        conn.execute(leave.format(**objects))
        conn.commit()
        conn.execute(undo)  # looks clean now; the hand-back's ROLLBACK undoes this
        return str(conn.info.backend_pid)

    @app.get("/check")
    def check_it() -> dict[str, Any]:
        conn = get_conn()
        sql = check.format(login=conn.info.user, **objects)
        return {"pid": conn.info.backend_pid, "gone": bool(conn.execute(sql).fetchone()[0])}

    client = app.test_client()
    pid = int(client.get("/leave").data)
    assert client.get("/check").get_json() == {"pid": pid, "gone": True}
