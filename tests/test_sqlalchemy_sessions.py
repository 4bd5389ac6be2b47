"""Sessions that outlive their request (flask_reqconn/integrations/sqlalchemy/sessions.py).

The pattern of many test suites: ``with app.app_context():`` around the test client. Flask
reuses that context for every request, so Flask-SQLAlchemy's and -Lite's sessions (and a
thread-local ``scoped_session``) outlive each request. Each setup below is the one the
SQLAlchemy page documents, with the same views.
"""

from __future__ import annotations

import logging
import unittest
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from flask_reqconn import ConnectionReleased, ReqConn, get_conn, state_of, testing
from flask_reqconn.integrations.sqlalchemy import create_engine, engine_options
from tests import pg
from tests.sqla_models import Item, names

#: (app, the session the views use in the current application context)
Setup = tuple[Flask, Callable[[], Session]]


def add_views(app: Flask, session: Callable[[], Session]) -> None:
    @app.get("/")
    def index() -> list[str]:
        return list(session().scalars(select(Item.name).order_by(Item.id)))

    @app.post("/<name>")
    def add(name: str) -> tuple[str, int]:
        item = Item(name=name)
        session().add(item)
        session().commit()
        return str(item.id), 201

    @app.post("/open/<name>")
    def add_open(name: str) -> tuple[str, int]:
        session().add(Item(name=name))
        session().flush()  # never committed: rolled back at the end of the request
        return "flushed", 201

    @app.get("/count")
    def count() -> str:
        return str(session().scalar(select(func.count()).select_from(Item)))


def _config(app: Flask, pg_dsn: str, max_size: int) -> None:
    app.config.update(REQCONN_CONNINFO=pg_dsn, REQCONN_MAX_SIZE=max_size, REQCONN_TIMEOUT=5)


def flask_sqlalchemy_app(pg_dsn: str, max_size: int = 1) -> Setup:
    from flask_sqlalchemy import SQLAlchemy

    app = Flask(pg.unique_name("fsqla_ctx"))
    _config(app, pg_dsn, max_size)
    app.config.update(
        SQLALCHEMY_DATABASE_URI="postgresql+psycopg://",
        SQLALCHEMY_ENGINE_OPTIONS=engine_options(),
    )
    ReqConn(app)
    db = SQLAlchemy(app)
    add_views(app, db.session)
    return app, db.session


def lite_app(pg_dsn: str, max_size: int = 1) -> Setup:
    from flask_sqlalchemy_lite import SQLAlchemy

    app = Flask(pg.unique_name("lite_ctx"))
    _config(app, pg_dsn, max_size)
    app.config["SQLALCHEMY_ENGINES"] = {
        "default": {"url": "postgresql+psycopg://", **engine_options()}
    }
    ReqConn(app)
    db = SQLAlchemy(app)
    add_views(app, lambda: db.session)
    return app, lambda: db.session


def plain_app(pg_dsn: str, max_size: int = 1) -> Setup:
    """Flask's own SQLAlchemy pattern: a thread-local scoped_session removed at the end
    of the application context."""
    app = Flask(pg.unique_name("plain_ctx"))
    _config(app, pg_dsn, max_size)
    ReqConn(app)
    db_session = scoped_session(sessionmaker(create_engine()))

    @app.teardown_appcontext
    def remove_session(exc: BaseException | None) -> None:
        db_session.remove()

    add_views(app, db_session)
    return app, db_session


SETUPS = {"flask_sqlalchemy": flask_sqlalchemy_app, "lite": lite_app, "plain": plain_app}


@pytest.fixture(params=sorted(SETUPS))
def setup(request: pytest.FixtureRequest, pg_dsn: str, items: str) -> Iterator[Setup]:
    """The app of each setup, with a pool of one."""
    app, session = SETUPS[request.param](pg_dsn)
    with testing.closing(app):
        yield app, session


@pytest.fixture(params=sorted(SETUPS))
def setup2(request: pytest.FixtureRequest, pg_dsn: str, items: str) -> Iterator[Setup]:
    """The app of each setup, with a pool of two."""
    app, session = SETUPS[request.param](pg_dsn, max_size=2)
    with testing.closing(app):
        yield app, session


def test_the_same_get_twice_in_a_pushed_app_context(setup: Setup) -> None:
    app, _ = setup
    with app.app_context():
        client = app.test_client()
        first, second = client.get("/"), client.get("/")
    assert (first.status_code, second.status_code) == (200, 200), second.text


def test_writes_reads_and_the_test_body_share_a_pushed_app_context(
    setup: Setup, pg_admin: psycopg.Connection[Any]
) -> None:
    app, session = setup
    with app.app_context():
        client = app.test_client()
        assert client.post("/a").status_code == 201
        assert client.get("/").json == ["a"]
        # the test body uses the same session, outside requests (a connection of its own)
        session().add(Item(name="from the test"))
        session().commit()
        assert client.post("/b").status_code == 201
        assert client.get("/").json == ["a", "from the test", "b"]
        assert session().scalars(select(Item.name).order_by(Item.id)).all() == [
            "a", "from the test", "b"
        ]  # fmt: skip
    assert names(pg_admin) == ["a", "from the test", "b"]


def test_uncommitted_work_is_rolled_back_and_the_session_knows_it(
    setup: Setup, pg_admin: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    app, session = setup
    with app.app_context():
        client = app.test_client()
        with caplog.at_level(logging.WARNING, logger="flask_reqconn"):
            assert client.post("/open/lost").status_code == 201
        assert "rolled back uncommitted writes" in caplog.text
        # SQLAlchemy's side was rolled back too: the flushed object is gone from the
        # session, not believed persistent
        assert not session().in_transaction()
        assert all(getattr(obj, "name", None) != "lost" for obj in session())
        assert client.get("/").json == []
        assert client.post("/kept").status_code == 201
        assert client.get("/count").text == "1"
    assert names(pg_admin) == ["kept"]


def test_a_transaction_begun_in_the_test_body_goes_on_in_the_requests(
    setup2: Setup, pg_admin: psycopg.Connection[Any]
) -> None:
    """As with the app's own pool: the view runs in the session's transaction, on the
    connection of its own the test body took; the request's connection serves the rest."""
    app, session = setup2

    @app.post("/then-get-conn/<name>")
    def add_then_get_conn(name: str) -> str:
        item = Item(name=name)
        session().add(item)
        session().commit()  # ends the test body's transaction: its connection goes back
        return f"{item.id} {get_conn().execute('SELECT 1').fetchone()}"

    with app.app_context():
        client = app.test_client()
        assert client.post("/a").status_code == 201
        assert session().scalars(select(Item.name)).all() == ["a"]  # left open
        session().add(Item(name="pending"))  # not flushed yet
        assert client.get("/").json == ["a", "pending"]  # autoflushed in the same transaction
        response = client.post("/then-get-conn/b")
        assert (response.status_code, response.text) == (200, "3 (1,)"), response.text
        assert client.get("/").json == ["a", "pending", "b"]
        session().scalars(select(Item.name)).all()  # the test body again, then closing
        session().close()
    assert names(pg_admin) == ["a", "pending", "b"]
    testing.assert_no_checkouts(app)


def test_orm_objects_kept_across_requests_reload(setup: Setup) -> None:
    app, session = setup
    kept: list[Item] = []

    @app.get("/keep")
    def keep() -> str:
        kept.extend(session().scalars(select(Item).order_by(Item.id)))
        return "kept"

    @app.get("/kept")
    def read_kept() -> list[str]:
        return [item.name for item in kept]  # expired at the last release: reloaded here

    with app.app_context():
        client = app.test_client()
        client.post("/a")
        client.post("/b")
        assert client.get("/keep").status_code == 200
        assert client.get("/kept").json == ["a", "b"]
        assert [item.name for item in kept] == ["a", "b"]  # and in the test body


def test_a_streamed_response_then_a_request_in_a_pushed_app_context(setup: Setup) -> None:
    from flask import Response, stream_with_context

    app, session = setup

    @app.get("/feed")
    def feed() -> Response:
        def names() -> Iterator[str]:
            for item in session().scalars(select(Item).order_by(Item.id)):
                yield item.name + "\n"

        return Response(stream_with_context(names()))

    with app.app_context():
        client = app.test_client()
        client.post("/a")
        response = client.get("/feed")
        assert response.text == "a\n"  # read to the end: released at close()
        response.close()
        assert client.get("/").json == ["a"]
        assert client.get("/feed").text == "a\n"


def test_a_begin_block_spanning_two_requests_names_the_cause_and_the_fix(
    setup: Setup, pg_admin: psycopg.Connection[Any]
) -> None:
    app, session = setup

    @app.post("/in-block/<name>")
    def in_block(name: str) -> str:
        session().add(Item(name=name))
        session().flush()
        return "flushed"

    with app.app_context():
        client = app.test_client()
        with pytest.raises(sa.exc.StatementError) as caught:  # noqa: PT012
            with session().begin():  # begun in the test body, connected in the request
                assert client.post("/in-block/x").status_code == 200
                session().execute(text("SELECT 1"))
        assert isinstance(caught.value.orig, ConnectionReleased)
        message = str(caught.value.orig)
        assert "POST /in-block/x" in message and "'with session.begin():'" in message
        assert "End the block" in message
        # the block ended with the error: the session works again
        assert client.get("/").json == []
    assert names(pg_admin) == []


def test_a_session_used_by_two_requests_sees_each_ones_connection(setup: Setup) -> None:
    app, session = setup

    @app.get("/pid")
    def pid() -> str:
        return str(session().execute(text("SELECT pg_backend_pid()")).scalar())

    with app.app_context():
        client = app.test_client()
        pids = {client.get("/pid").text for _ in range(3)}
    assert len(pids) == 1  # a pool of one: the same backend, checked out three times
    testing.assert_no_checkouts(app)


def test_the_sweep_only_rolls_back_the_releasing_threads_sessions(
    make_app: Any, items: str
) -> None:
    """A session whose request still runs (another thread) is left alone."""
    import threading

    app = make_app(max_size=2)
    engine = create_engine()
    started, finish = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    @app.get("/slow")
    def slow() -> str:
        with Session(engine) as s:
            s.add(Item(name="slow"))
            s.flush()
            started.set()
            finish.wait(10)
            seen["still"] = s.in_transaction()
            s.commit()
        return "ok"

    @app.get("/fast")
    def fast() -> str:
        return str(Session(engine).execute(text("SELECT 1")).scalar())

    worker = threading.Thread(target=lambda: app.test_client().get("/slow"))
    worker.start()
    try:
        assert started.wait(10)
        assert app.test_client().get("/fast").text == "1"  # its release sweeps
    finally:
        finish.set()
        worker.join(10)
    assert seen == {"still": True}


class PushedAppContextCase(unittest.TestCase):
    """A unittest suite in the style of Flask-SQLAlchemy's: setUp pushes an app context."""

    pg_dsn: str
    make: Callable[[str], Setup] = staticmethod(flask_sqlalchemy_app)  # type: ignore[assignment]

    @pytest.fixture(autouse=True)
    def _dsn(self, pg_dsn: str, items: str) -> None:  # unittest cases get no arguments
        self.pg_dsn = pg_dsn

    def setUp(self) -> None:
        self.app, self.session = self.make(self.pg_dsn)
        self.ctx = self.app.app_context()
        self.ctx.push()
        self.client = self.app.test_client()

    def tearDown(self) -> None:
        self.ctx.pop()
        testing.assert_no_checkouts(self.app)
        state_of(self.app).close()

    def test_get_twice(self) -> None:
        self.assertEqual(self.client.get("/").status_code, 200)
        self.assertEqual(self.client.get("/").status_code, 200)

    def test_post_then_get(self) -> None:
        self.assertEqual(self.client.post("/a").status_code, 201)
        self.assertEqual(self.client.get("/").json, ["a"])
        self.assertEqual(self.client.get("/count").text, "1")


class PushedAppContextLiteCase(PushedAppContextCase):
    make = staticmethod(lite_app)  # type: ignore[assignment]


class PushedAppContextPlainCase(PushedAppContextCase):
    make = staticmethod(plain_app)  # type: ignore[assignment]


def test_the_sqlalchemy_internal_the_sweep_reads_has_its_shape() -> None:
    """``sessions.sweep()`` tells a ``with session.begin():`` block in progress by
    SQLAlchemy's ``Session._trans_context_manager``. If a release changes that, a
    block spanning two requests would be rolled back silently: fail here first,
    before the upper bound on SQLAlchemy in pyproject.toml is raised."""
    session = Session()
    assert session._trans_context_manager is None
    with session.begin():
        assert session._trans_context_manager is not None
    assert session._trans_context_manager is None
