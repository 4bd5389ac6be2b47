"""SQLAlchemy Core and ORM on the request's connection (flask_reqconn.integrations.sqlalchemy).

In-process requests through Flask's test client against the real test PostgreSQL. The
end-to-end proofs under gunicorn are in test_sqlalchemy_servers.py.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections import Counter
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from flask import Flask
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from sqlalchemy import event, select, text
from sqlalchemy.exc import ArgumentError, IntegrityError
from sqlalchemy.orm import Session

from flask_reqconn import ConnectionReleased, ReqConnError, get_conn
from flask_reqconn.integrations.sqlalchemy import RequestPool, create_engine, engine_options
from tests.appfixtures import AppFactory, reqconn_of
from tests.sqla_models import Item, names


def backend(conn: sa.Connection | Session) -> int:
    return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_importing_flask_reqconn_does_not_import_sqlalchemy() -> None:
    code = (
        "import sys, flask_reqconn, flask_reqconn.extension, flask_reqconn.integrations;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('sqlalchemy', 'flask_sqlalchemy', 'flask_sqlalchemy_lite')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_core_and_orm_run_on_the_requests_connection(make_app: AppFactory, items: str) -> None:
    app = make_app()
    engine = create_engine()

    @app.get("/")
    def index() -> dict[str, int]:
        with engine.connect() as conn:
            core = backend(conn)
        with Session(engine) as session:
            orm = backend(session)
        return {"core": core, "orm": orm, "reqconn": get_conn().info.backend_pid}

    data = app.test_client().get("/").json
    assert data is not None and data["core"] == data["orm"] == data["reqconn"]
    stats = reqconn_of(app).stats(app)
    assert stats["checkouts"] == 1 and stats["checked_out"] == 0


def test_lazy_checkout_happens_at_the_first_sqlalchemy_use(make_app: AppFactory) -> None:
    app = make_app(checkout="lazy")
    engine = create_engine()

    @app.get("/nodb")
    def nodb() -> str:
        Session(engine)  # a session takes no connection until it runs something
        return "ok"

    @app.get("/db")
    def db() -> str:
        with Session(engine) as session:
            return str(session.execute(text("SELECT 1")).scalar_one())

    client = app.test_client()
    assert client.get("/nodb").status_code == 200
    assert reqconn_of(app).stats(app)["checkouts"] == 0
    assert client.get("/db").text == "1"
    assert reqconn_of(app).stats(app)["checkouts"] == 1


def test_orm_commit_persists_and_rollback_discards(
    make_app: AppFactory, items: str, pg_admin: psycopg.Connection[Any]
) -> None:
    app = make_app()
    engine = create_engine()

    @app.post("/<name>")
    def add(name: str) -> str:
        with Session(engine) as session:
            session.add(Item(name=name))
            session.flush()
            if name.startswith("keep"):
                session.commit()
            else:
                session.rollback()
        return "ok"

    @app.post("/rename/<old>/<new>")
    def rename(old: str, new: str) -> str:
        with Session(engine) as session:
            item = session.scalars(select(Item).where(Item.name == old)).one()
            item.name = new
            session.commit()
            session.delete(session.scalars(select(Item).where(Item.name == new)).one())
            session.flush()
            session.rollback()  # the delete is undone
        return "ok"

    client = app.test_client()
    for name in ("keep1", "drop1", "keep2"):
        assert client.post(f"/{name}").status_code == 200
    assert client.post("/rename/keep2/keep3").status_code == 200
    assert names(pg_admin) == ["keep1", "keep3"]


def test_integrity_error_then_more_work_in_the_same_request(
    make_app: AppFactory, items: str, pg_admin: psycopg.Connection[Any]
) -> None:
    app = make_app()
    engine = create_engine()

    @app.post("/")
    def add() -> dict[str, Any]:
        with Session(engine) as session:
            session.add(Item(name="a"))
            session.commit()
            session.add(Item(name="a"))
            try:
                session.commit()
            except IntegrityError:
                session.rollback()
                failed = True
            session.add(Item(name="b"))
            session.commit()
            count = session.scalar(select(sa.func.count()).select_from(Item))
        return {"failed": failed, "count": count}

    assert app.test_client().post("/").json == {"failed": True, "count": 2}
    assert names(pg_admin) == ["a", "b"]
    assert reqconn_of(app).stats(app)["checked_out"] == 0


def test_get_conn_and_sessions_share_one_transaction(
    make_app: AppFactory, items: str, pg_admin: psycopg.Connection[Any]
) -> None:
    app = make_app()
    engine = create_engine()

    @app.post("/commit")
    def commit() -> str:
        get_conn().execute(f"INSERT INTO {items} (name) VALUES ('raw')")
        first, second = Session(engine), Session(engine)
        first.add(Item(name="first"))
        first.flush()
        # the second session sees the first one's uncommitted row: same transaction
        seen = second.scalars(select(Item.name).order_by(Item.id)).all()
        second.commit()  # commits all three writes
        first.close()
        return ",".join(seen)

    @app.post("/rollback")
    def rollback() -> str:
        get_conn().execute(f"INSERT INTO {items} (name) VALUES ('raw2')")
        with Session(engine) as session:
            session.add(Item(name="orm2"))
            session.flush()
            session.rollback()  # rolls back get_conn()'s insert too
        get_conn().commit()
        return "ok"

    client = app.test_client()
    assert client.post("/commit").text == "raw,first"
    assert client.post("/rollback").status_code == 200
    assert names(pg_admin) == ["raw", "first"]


def test_session_work_left_open_is_rolled_back_and_invisible_to_the_next_request(
    make_app: AppFactory, items: str, pg_admin: psycopg.Connection[Any], caplog: Any
) -> None:
    app = make_app(max_size=1)
    engine = create_engine()
    kept: list[Session] = []

    @app.post("/")
    def leave_open() -> str:
        session = Session(engine)
        kept.append(session)  # never closed by the view
        session.execute(text("SET statement_timeout = 1234"))
        session.execute(text("SELECT set_config('reqconn.test', 'leaked', false)"))
        session.execute(text("CREATE TEMP TABLE leftover (x int)"))
        session.add(Item(name="uncommitted"))
        session.flush()
        return str(backend(session))

    @app.get("/")
    def look() -> dict[str, Any]:
        with Session(engine) as session:
            return {
                "backend": backend(session),
                "timeout": session.execute(text("SHOW statement_timeout")).scalar_one(),
                "setting": session.execute(
                    text("SELECT current_setting('reqconn.test', true)")
                ).scalar_one(),
                "temp": session.execute(text("SELECT to_regclass('leftover')")).scalar_one(),
                "items": session.scalars(select(Item.name)).all(),
            }

    client = app.test_client()
    with caplog.at_level(logging.WARNING, logger="flask_reqconn"):
        pid = int(client.post("/").text)
    assert "rolled back uncommitted writes" in caplog.text
    seen = client.get("/").json
    assert seen is not None and seen.pop("setting") in (None, "")  # reset, not 'leaked'
    assert seen == {"backend": pid, "timeout": "0", "temp": None, "items": []}
    assert names(pg_admin) == []
    # the session kept past its request closes without touching the connection
    kept[0].close()


def test_a_session_closed_after_its_request_cannot_touch_the_next_requests_work(
    make_app: AppFactory, items: str, pg_admin: psycopg.Connection[Any]
) -> None:
    """Flask runs teardown_appcontext (Flask-SQLAlchemy's session.remove()) after
    teardown_request: by then the connection may be another request's."""
    app = make_app(max_size=1)
    engine = create_engine()
    kept: list[Session] = []

    @app.post("/first")
    def first() -> str:
        session = Session(engine)
        session.add(Item(name="first, never committed"))
        session.flush()
        kept.append(session)
        return str(get_conn().info.backend_pid)

    @app.post("/second")
    def second() -> str:
        conn = get_conn()  # the same psycopg connection (pool of one)
        conn.execute(f"INSERT INTO {items} (name) VALUES ('second')")
        # its transaction ended with its request: nothing left to roll back here
        assert not kept[0].in_transaction()
        kept[0].close()  # would ROLLBACK 'second' if it still reached the connection
        conn.commit()
        return str(conn.info.backend_pid)

    client = app.test_client()
    assert client.post("/first").text == client.post("/second").text
    assert names(pg_admin) == ["second"]


def test_dialect_initialises_once_without_leaving_a_transaction_open(
    make_app: AppFactory, items: str, pg_admin: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    app = make_app()
    engine = create_engine()
    calls: list[int] = []
    initialize = engine.dialect.initialize
    monkeypatch.setattr(
        engine.dialect, "initialize", lambda c: (calls.append(1), initialize(c))[1]
    )

    @app.post("/")
    def index() -> str:
        # work done before SQLAlchemy's first use must survive its initialisation
        get_conn().execute(f"INSERT INTO {items} (name) VALUES ('before')")
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            conn.commit()  # commits the request's transaction: 'before' included
        return get_conn().info.transaction_status.name

    @app.get("/idle")
    def idle() -> str:
        with engine.connect():
            pass
        return get_conn().info.transaction_status.name

    client = app.test_client()
    assert client.post("/").text == "IDLE"
    assert names(pg_admin) == ["before"]
    pg_admin.execute(f"DELETE FROM {items}")
    assert client.post("/").text == "IDLE"
    assert calls == [1]
    assert engine.dialect.server_version_info is not None
    assert client.get("/idle").text == "IDLE"


def test_outside_requests_each_checkout_is_a_connection_of_its_own(
    make_app: AppFactory, items: str, pg_admin: psycopg.Connection[Any]
) -> None:
    app = make_app(max_size=1)
    engine = create_engine()
    reqconn = reqconn_of(app)
    with app.app_context():
        with Session(engine) as session:
            session.add(Item(name="script"))
            session.execute(text("SET statement_timeout = 4321"))
            assert reqconn.stats(app)["pools"]["default"]["pool"]["pool_available"] == 0
            session.commit()
        assert names(pg_admin) == ["script"]
        raw = engine.raw_connection()  # DBAPI level: not committed at check-in
        raw.cursor().execute(f"INSERT INTO {items} (name) VALUES ('raw, uncommitted')")
        raw.close()
        with engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "0"
    assert names(pg_admin) == ["script"]
    assert reqconn.stats(app)["checked_out"] == 0
    with pytest.raises(ReqConnError, match=r"app_context\(\):' \(Alembic's env.py"):
        engine.connect()


def test_exhausted_pool_answers_503_through_a_session(make_app: AppFactory) -> None:
    app = make_app(max_size=1, timeout=0.2, checkout="lazy")
    engine = create_engine()

    @app.get("/")
    def index() -> str:
        with Session(engine) as session:
            return str(session.execute(text("SELECT 1")).scalar_one())

    with reqconn_of(app).connection(app=app):  # the only connection
        response = app.test_client().get("/")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert app.test_client().get("/").text == "1"


def test_statement_timeout_through_sqlalchemy_stays_an_error(make_app: AppFactory) -> None:
    app = make_app(session_settings={"statement_timeout": "100ms"})
    engine = create_engine()

    @app.get("/")
    def index() -> str:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_sleep(2)"))
        return "unreachable"

    assert app.test_client().get("/").status_code == 500


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"pool_pre_ping": True}, "pool_pre_ping"),
        ({"pool_recycle": 3600}, "pool_recycle"),
        ({"pool_reset_on_return": "rollback"}, "pool_reset_on_return"),
        ({"pool_size": 5}, "pool_size"),
        ({"max_overflow": 10}, "max_overflow"),
        ({"json_serializer": str}, "json_serializer"),
    ],
)
def test_options_that_would_manage_the_connection_twice_are_refused(
    options: dict[str, Any], key: str
) -> None:
    with pytest.raises((ArgumentError, TypeError), match=key):
        create_engine(**options)


def test_only_the_psycopg_dialect_is_accepted() -> None:
    with pytest.raises(ArgumentError, match=r"postgresql\+psycopg://"):
        sa.create_engine("sqlite://", **engine_options())


def test_a_named_pool_is_used(make_app: AppFactory, pg_dsn: str) -> None:
    app = make_app(pools={"other": {"CONNINFO": pg_dsn, "MAX_SIZE": 1}})
    engine = create_engine(pool="other")
    assert isinstance(engine.pool, RequestPool)

    @app.get("/")
    def index() -> str:
        with engine.connect() as conn:
            return str(backend(conn) == get_conn("other").info.backend_pid)

    assert app.test_client().get("/").text == "True"
    assert reqconn_of(app).stats(app)["pools"]["other"]["checkouts"] == 1


def test_pool_and_session_events(make_app: AppFactory) -> None:
    """Which events fire, and how often (the table on the SQLAlchemy docs page)."""
    app = make_app(max_size=1)
    engine = create_engine()
    fired: Counter[str] = Counter()
    resets: list[bool] = []
    for name in ("connect", "first_connect", "checkout", "checkin", "invalidate",
                 "soft_invalidate", "close", "close_detached", "detach"):  # fmt: skip
        event.listen(engine, name, lambda *a, _n=name: fired.update([_n]))
    event.listen(engine, "reset", lambda c, r, state: resets.append(state.transaction_was_reset))
    for name in ("after_begin", "after_commit", "after_rollback", "after_soft_rollback"):
        event.listen(Session, name, lambda *a, _n=name: fired.update([_n]))

    @event.listens_for(engine, "connect")
    def set_search_path(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.cursor().execute("SET application_name = 'set-by-connect'")

    @app.get("/")
    def index() -> str:
        with Session(engine) as session:
            session.execute(text("SELECT 1"))
            session.commit()
            session.execute(text("SELECT 1"))  # a second transaction, a second checkout
            session.rollback()
            session.execute(text("SELECT 1"))  # a third, rolled back by close()
        with engine.connect() as conn:
            name = conn.execute(text("SHOW application_name")).scalar_one()
        return str(name)

    @app.get("/invalidate")
    def invalidate() -> str:
        with engine.connect() as conn:
            conn.invalidate()
        with engine.connect() as conn:  # a fresh SQLAlchemy record on the same lease
            return str(backend(conn) == get_conn().info.backend_pid)

    client = app.test_client()
    assert client.get("/").text == "set-by-connect"
    assert client.get("/").text == "set-by-connect"  # reset at hand-back, set again
    assert fired == {
        "first_connect": 1,
        "connect": 2,  # once per request
        "checkout": 8,  # once per SQLAlchemy transaction (four per request)
        "checkin": 8,
        "after_begin": 6,
        "after_commit": 2,
        "after_rollback": 2,  # the explicit rollback(); close() fires none
        "after_soft_rollback": 2,
    }
    assert len(resets) == 8  # transaction_was_reset: True after a Connection rolled back

    fired.clear()
    assert client.get("/invalidate").text == "True"
    # connect: the request's first record, then the one replacing the invalidated record
    assert (fired["invalidate"], fired["close"], fired["connect"]) == (1, 1, 2)
    assert reqconn_of(app).stats(app)["pools"]["default"]["discarded_connections"] == 0


@pytest.mark.parametrize("how", ["soft", "interrupted"])
def test_an_invalidated_record_is_replaced_on_the_same_connection(
    make_app: AppFactory, how: str
) -> None:
    """A record SQLAlchemy invalidated but still holding the wrapper (a soft invalidation,
    or a hard one that a listener of the app's interrupted) is not handed out again: the
    pool's own ``invalidate``/``soft_invalidate`` listener, first of all, made the wrapper
    forget it. Handed out, SQLAlchemy would reconnect it, which RequestPool cannot do."""
    app = make_app(max_size=1)
    engine = create_engine()
    records: list[Any] = []
    event.listen(engine, "connect", lambda dbapi_connection, record: records.append(record))

    def refuse(*args: Any) -> None:
        raise RuntimeError("a listener of the app's")

    if how == "interrupted":
        event.listen(engine, "invalidate", refuse)

    @app.get("/")
    def index() -> str:
        with engine.connect() as conn:
            first = backend(conn)
            if how == "soft":
                conn.connection.invalidate(soft=True)
            else:
                with pytest.raises(RuntimeError, match="of the app's"):
                    conn.invalidate()
        with engine.connect() as conn:
            assert backend(conn) == first == get_conn().info.backend_pid
        with engine.connect() as conn:  # the new record is kept for the request
            assert backend(conn) == first
        return "ok"

    assert app.test_client().get("/").text == "ok"
    assert len(records) == 2 and records[0] is not records[1]


def test_the_wrappers_own_state_is_read_only(make_app: AppFactory) -> None:
    """RequestConnection's state changes through its own methods only."""
    app = make_app()
    engine = create_engine()

    @app.get("/")
    def index() -> str:
        with engine.connect() as conn:
            proxy = conn.connection.dbapi_connection
            for name in ("lease", "record", "_conn", "_release", "_savepoint"):
                with pytest.raises(AttributeError, match="its own methods"):
                    setattr(proxy, name, None)
            assert proxy.lease is not None and proxy.record is not None
            assert backend(conn) == get_conn().info.backend_pid
        return "ok"

    assert app.test_client().get("/").text == "ok"


def test_sqlalchemy_notice_logging_does_not_pile_up(make_app: AppFactory, caplog: Any) -> None:
    app = make_app(max_size=1)
    engine = create_engine()

    @app.get("/")
    def index() -> str:
        with engine.connect() as conn:
            conn.execute(text("DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$"))
        return "ok"

    client = app.test_client()
    with caplog.at_level(logging.INFO, logger="sqlalchemy.dialects.postgresql"):
        for _ in range(5):
            assert client.get("/").status_code == 200
    assert caplog.text.count("hello from plpgsql") == 5


def test_driver_connection_is_the_psycopg_connection(make_app: AppFactory) -> None:
    app = make_app()
    engine = create_engine()

    @app.get("/")
    def index() -> str:
        with engine.connect() as conn:
            driver = conn.connection.driver_connection
            return str(isinstance(driver, psycopg.Connection) and driver is get_conn())

    assert app.test_client().get("/").text == "True"


def test_one_rollback_per_request_no_reset_on_return(
    make_app: AppFactory, tmp_path: Any
) -> None:
    """libpq's protocol trace of a request: SQLAlchemy sends no ROLLBACK of its own."""
    app: Flask = make_app(max_size=1, reset_session=False)
    engine = create_engine()
    trace = tmp_path / "trace.txt"

    @app.get("/")
    def index() -> str:
        session = Session(engine)
        session.execute(text("SELECT 1"))
        return "ok"  # left open: the hand-back rolls back, once

    client = app.test_client()
    client.get("/")  # dialect initialisation happens here, not traced
    with reqconn_of(app).connection(app=app) as conn:
        pgconn = conn.pgconn
    with open(trace, "w") as f:
        pgconn.trace(f.fileno())
        try:
            assert client.get("/").status_code == 200
            with app.app_context():
                reqconn_of(app).stats(app)
        finally:
            pgconn.untrace()
    queries = [line for line in trace.read_text().splitlines() if "\tQuery\t" in line]
    assert sum("ROLLBACK" in q for q in queries) == 1, queries
    assert sum("SELECT 1" in q for q in queries) == 1, queries
    assert conn.info.transaction_status == TransactionStatus.IDLE


def test_a_row_factory_in_connect_args_is_for_get_conn_not_for_sqlalchemy(
    make_app: AppFactory, items: str
) -> None:
    """``REQCONN_CONNECT_ARGS = {"row_factory": dict_row}`` (documented for get_conn())
    must not reach SQLAlchemy's cursors, which read rows by position: the dialect's first
    ``select version()`` failed with it, in a user trial."""
    app = make_app(connect_args={"row_factory": dict_row}, checkout="lazy")
    engine = create_engine()

    @app.post("/")
    def add() -> str:
        with Session(engine) as session:
            session.add(Item(name="dict"))
            session.commit()
            orm = session.scalars(select(Item.name)).all()
            ss = session.execute(
                select(Item.name), execution_options={"stream_results": True}
            ).scalars().all()  # a server-side (named) cursor
        raw = get_conn().execute(f"SELECT count(*) AS n FROM {items}").fetchone()
        return f"{orm} {ss} {raw}"

    assert app.test_client().post("/").text == "['dict'] ['dict'] {'n': 1}"
    with app.app_context(), engine.connect() as conn:  # a connection of its own
        assert conn.execute(text("SELECT 1 AS one")).one() == (1,)


def test_strict_mode_covers_what_sqlalchemy_is_given(
    make_app: AppFactory, items: str, reqconn_strict: None
) -> None:
    """In strict mode SQLAlchemy runs on get_conn()'s checking proxy: the ORM works, and
    a server-side cursor or a driver connection kept past the request raises."""
    app = make_app()
    engine = create_engine()
    kept: dict[str, Any] = {}

    @app.post("/")
    def add() -> str:
        with Session(engine) as session:
            session.add_all([Item(name=n) for n in ("a", "b", "c")])
            session.commit()
            return ",".join(session.scalars(select(Item.name).order_by(Item.id)))

    @app.get("/stream")
    def stream() -> str:
        conn = engine.connect()  # kept open on purpose
        result = conn.execution_options(stream_results=True, max_row_buffer=1).execute(
            select(Item.name).order_by(Item.id)
        )
        kept["result"] = result
        kept["driver"] = conn.connection.driver_connection
        return str(result.fetchone())

    client = app.test_client()
    assert client.post("/").text == "a,b,c"
    assert client.get("/stream").status_code == 200
    with pytest.raises(ConnectionReleased, match="handed back"):
        kept["driver"].execute("SELECT 1")
    with pytest.raises((ConnectionReleased, sa.exc.StatementError)) as caught:
        kept["result"].fetchall()  # would FETCH on a connection back in the pool
    error = caught.value
    released = error if isinstance(error, ConnectionReleased) else error.orig
    assert isinstance(released, ConnectionReleased), error
