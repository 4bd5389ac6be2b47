"""Flask-SQLAlchemy 3.1 and Flask-SQLAlchemy-Lite on flask-reqconn, in process.

The Flask-SQLAlchemy app is tests/apps/fsqla_app.py (the one served by gunicorn in
test_sqlalchemy_servers.py); the Lite app is built here on the ORM models of
tests/sqla_models.py.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from flask import Flask, Response, stream_with_context
from flask_sqlalchemy_lite import SQLAlchemy as LiteSQLAlchemy
from psycopg import sql
from sqlalchemy import select, text
from sqlalchemy.exc import ArgumentError, OperationalError

from flask_reqconn import DatabaseUnavailable, ReqConn
from flask_reqconn.integrations.sqlalchemy import RequestPool, engine_options
from tests import pg
from tests.apps import fsqla_app
from tests.sqla_models import Item, names


@pytest.fixture
def fsqla(pg_dsn: str, pg_admin: psycopg.Connection[Any]) -> Iterator[Flask]:
    """tests/apps/fsqla_app.py on flask-reqconn, its table created and dropped."""
    table = sql.Identifier(fsqla_app.TABLE)
    pg_admin.execute(
        sql.SQL("CREATE TABLE {} (id serial PRIMARY KEY, name text UNIQUE NOT NULL)").format(
            table
        )
    )
    app = fsqla_app.create_app(dsn=pg_dsn, appname=pg.unique_name("fsqla"), pool_size=2)
    try:
        yield app
    finally:
        stats = fsqla_app.reqconn.stats(app)
        fsqla_app.reqconn.close(app)
        pg_admin.execute(sql.SQL("DROP TABLE {}").format(table))
        assert stats["checked_out"] == 0, stats


def fsqla_names(admin: psycopg.Connection[Any]) -> list[str]:
    query = sql.SQL("SELECT name FROM {} ORDER BY id").format(sql.Identifier(fsqla_app.TABLE))
    return [row[0] for row in admin.execute(query).fetchall()]


def test_flask_sqlalchemy_engine_is_on_the_request_pool(fsqla: Flask) -> None:
    with fsqla.app_context():
        assert isinstance(fsqla_app.db.engine.pool, RequestPool)


def test_flask_sqlalchemy_crud_commit_and_rollback(
    fsqla: Flask, pg_admin: psycopg.Connection[Any], caplog: Any
) -> None:
    client = fsqla.test_client()
    assert client.post("/items?name=a").status_code == 201
    with caplog.at_level(logging.WARNING, logger="flask_reqconn"):
        assert client.post("/items?name=b&commit=0").status_code == 201  # flushed only
    assert "rolled back uncommitted writes" in caplog.text
    assert "session.commit()" in caplog.text  # the advice SQLAlchemy users can follow
    assert client.post("/items?name=c").status_code == 201
    assert fsqla_names(pg_admin) == ["a", "c"]
    assert client.get("/").text == "2"
    stats = fsqla_app.reqconn.stats(fsqla)
    assert stats["checkouts"] == 4 and stats["checked_out"] == 0


def test_flask_sqlalchemy_get_or_404_and_paginate(fsqla: Flask) -> None:
    client = fsqla.test_client()
    for name in ("a", "b", "c"):
        client.post(f"/items?name={name}")
    assert client.get("/items/2").json == {"id": 2, "name": "b"}
    assert client.get("/items/99").status_code == 404
    assert client.get("/page").json == {"total": 3, "names": ["a", "b"]}
    assert fsqla_app.reqconn.stats(fsqla)["checked_out"] == 0


def test_flask_sqlalchemy_teardown_leaves_nothing_behind(fsqla: Flask) -> None:
    client = fsqla.test_client()
    client.post("/items?name=a&commit=0")
    with fsqla.app_context():  # the scoped session was removed at the end of the request
        assert fsqla_app.db.session.scalars(select(fsqla_app.Item.name)).all() == []
        assert fsqla_app.db.session.execute(text("SHOW statement_timeout")).scalar() == "0"
    assert fsqla_app.reqconn.stats(fsqla)["releases"]["teardown"] == 1


def test_flask_sqlalchemy_create_all_in_an_app_context(fsqla: Flask) -> None:
    with fsqla.app_context():
        fsqla_app.db.create_all()  # the table exists: checks, creates nothing
        fsqla_app.db.session.add(fsqla_app.Item(name="cli"))
        fsqla_app.db.session.commit()
        assert fsqla_app.db.session.scalar(select(fsqla_app.Item.name)) == "cli"
    assert fsqla_app.reqconn.stats(fsqla)["checked_out"] == 0


def test_flask_sqlalchemy_init_app_refuses_pre_ping(pg_dsn: str) -> None:
    from flask_sqlalchemy import SQLAlchemy

    app = Flask("prepinged")
    app.config.update(
        REQCONN_CONNINFO=pg_dsn,
        SQLALCHEMY_DATABASE_URI="postgresql+psycopg://",
        SQLALCHEMY_ENGINE_OPTIONS={**engine_options(), "pool_pre_ping": True},
    )
    ReqConn(app)
    with pytest.raises(ArgumentError, match="pool_pre_ping"):
        SQLAlchemy(app)


def test_flask_sqlalchemy_lite_session_and_teardown(
    pg_dsn: str, items: str, pg_admin: psycopg.Connection[Any]
) -> None:
    app = Flask(pg.unique_name("lite"))
    app.config.update(
        REQCONN_CONNINFO=pg_dsn,
        REQCONN_MAX_SIZE=1,
        SQLALCHEMY_ENGINES={"default": {"url": "postgresql+psycopg://", **engine_options()}},
    )
    reqconn = ReqConn(app)
    db = LiteSQLAlchemy(app)

    @app.post("/<name>")
    def add(name: str) -> str:
        db.session.add(Item(name=name))
        if name != "open":
            db.session.commit()
        else:
            db.session.flush()
        return str(db.session.execute(text("SELECT pg_backend_pid()")).scalar())

    @app.get("/")
    def list_items() -> list[str]:
        return list(db.session.scalars(select(Item.name).order_by(Item.id)))

    client = app.test_client()
    try:
        assert client.post("/a").status_code == 200
        assert client.post("/open").status_code == 200
        assert client.get("/").json == ["a"]
        with app.app_context():
            assert isinstance(db.engine.pool, RequestPool)
            assert db.session.scalars(select(Item.name)).all() == ["a"]
        assert names(pg_admin) == ["a"]
        assert reqconn.stats(app)["checked_out"] == 0
    finally:
        reqconn.close(app)


def _kill_when_running(admin: psycopg.Connection[Any], appname: str) -> threading.Thread:
    def kill() -> None:
        pg.wait_until(
            lambda: admin.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
                " WHERE application_name = %s AND state = 'active'",
                (appname,),
            ).fetchall(),
            timeout=30,
        )

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    return killer


def test_flask_sqlalchemy_lost_connection_answers_503_then_the_next_request_200(
    fsqla: Flask, pg_admin: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The backend killed under ``db.session.execute``: SQLAlchemy's OperationalError
    (wrapping psycopg's AdminShutdown) becomes DatabaseUnavailable, as with get_conn()."""
    client = fsqla.test_client()
    assert client.get("/select1").status_code == 200
    killer = _kill_when_running(pg_admin, fsqla.name)
    with caplog.at_level(logging.WARNING):
        response = client.get("/slow?s=30")
    killer.join()
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "1"
    assert "lost its database connection" in response.text
    lost = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lost) == 1 and lost[0].name == "flask_reqconn.pool", caplog.text
    assert "lost during GET /slow: answered 503 (AdminShutdown" in lost[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info]
    assert client.get("/select1").status_code == 200  # the connection is back
    stats = fsqla_app.reqconn.stats(fsqla)
    assert stats["connection_lost"] == 1 and stats["checked_out"] == 0, stats
    assert stats["discarded_connections"] == 1, stats
    assert stats["pools"]["default"]["pool"]["returns_bad"] == 1, stats  # given back once


def test_flask_sqlalchemy_lost_connection_through_the_apps_handler(
    fsqla: Flask, pg_admin: psycopg.Connection[Any]
) -> None:
    @fsqla.errorhandler(DatabaseUnavailable)
    def unavailable(exc: DatabaseUnavailable) -> tuple[dict[str, Any], int]:
        return {"error": "database", "cause": type(exc.__cause__).__name__}, 503

    killer = _kill_when_running(pg_admin, fsqla.name)
    response = fsqla.test_client().get("/slow?s=30")
    killer.join()
    assert response.status_code == 503
    assert response.json == {"error": "database", "cause": "AdminShutdown"}


def test_flask_sqlalchemy_other_operational_errors_stay_sqlalchemys(fsqla: Flask) -> None:
    @fsqla.get("/timeout")
    def timeout() -> str:
        try:
            fsqla_app.db.session.execute(text("SET LOCAL statement_timeout = 50"))
            fsqla_app.db.session.execute(text("SELECT pg_sleep(5)"))
        except OperationalError as exc:  # QueryCanceled (57014): not a lost connection
            return f"{type(exc).__name__} {type(exc.orig).__name__}"
        return "no error"

    client = fsqla.test_client()
    assert client.get("/timeout").text == "OperationalError QueryCanceled"
    assert client.get("/select1").status_code == 200
    assert fsqla_app.reqconn.stats(fsqla)["connection_lost"] == 0


def test_flask_sqlalchemy_stream_lost_before_its_first_chunk_answers_503(
    fsqla: Flask, pg_admin: psycopg.Connection[Any]
) -> None:
    """In a streamed body the integration leaves the counting and the answer to the WSGI
    wrapper: 503 once, counted once."""

    @fsqla.get("/firstfeed")
    def firstfeed() -> Response:
        def body() -> Iterator[str]:
            fsqla_app.db.session.execute(text("SELECT pg_sleep(30)"))
            yield "never\n"

        return Response(stream_with_context(body()), mimetype="text/plain")

    killer = _kill_when_running(pg_admin, fsqla.name)
    with fsqla.test_client().get("/firstfeed") as response:
        killer.join()
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    stats = fsqla_app.reqconn.stats(fsqla)
    assert stats["connection_lost"] == 1 and stats["checked_out"] == 0, stats
