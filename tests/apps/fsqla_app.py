"""A Flask-SQLAlchemy 3.1 app, on flask-reqconn or on Flask-SQLAlchemy's own pool.

The same models and views either way; only the engine options differ, which is the
migration the SQLAlchemy docs page describes. Configured from the environment (or
keyword arguments of :func:`create_app`, which win):

``FSQLA_DSN`` (required)
    libpq conninfo.
``FSQLA_MODE``
    ``reqconn`` (default): flask-reqconn's pool under the engine; ``native``: the control,
    Flask-SQLAlchemy's ``QueuePool`` (``pool_size`` = ``FSQLA_POOL_SIZE``, no overflow,
    ``pool_timeout`` = ``FSQLA_TIMEOUT``).
``FSQLA_POOL_SIZE`` (2), ``FSQLA_TIMEOUT`` (5 s), ``FSQLA_APPNAME`` (application_name),
``FSQLA_TABLE`` (the items table, which the caller creates).

Routes: ``/`` (count of items, ORM), ``/items`` (POST ``?name=``), ``/items/<id>``
(``db.get_or_404``), ``/page`` (``db.paginate``), ``/feed`` (a stream of ORM queries under
``stream_with_context``), ``/sleepfeed`` (a first line, then ``pg_sleep(30)`` in the
stream), ``/slow?s=`` (``pg_sleep``), ``/health``, ``/select1``, ``/read``, ``/nodb``, and
``/stats`` (``checked_out`` of the pool in use, ``views`` run).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
from flask import Flask, Response, jsonify, request, stream_with_context
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Integer, String, func, select, text
from sqlalchemy.orm import Mapped, mapped_column

from flask_reqconn import ReqConn
from flask_reqconn.integrations.sqlalchemy import engine_options

TABLE = os.environ.get("FSQLA_TABLE") or f"fsqla_items_{os.getpid()}"
FEED_TICKS = 50
FEED_EVERY = 0.02

db = SQLAlchemy()
reqconn = ReqConn()
_lock = threading.Lock()
_views: Counter[str] = Counter()


class Item(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = TABLE

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String, unique=True)


def _ran(view: str) -> None:
    with _lock:
        _views[view] += 1


def create_app(**overrides: Any) -> Flask:
    env = {key: os.environ.get(f"FSQLA_{key.upper()}") for key in
           ("dsn", "mode", "pool_size", "timeout", "appname")}  # fmt: skip
    env.update({k: None if v is None else str(v) for k, v in overrides.items()})
    dsn, mode = env["dsn"], env["mode"] or "reqconn"
    assert dsn, "FSQLA_DSN is required"
    pool_size = int(env["pool_size"] or 2)
    timeout = float(env["timeout"] or 5)
    appname = env["appname"] or "fsqla_app"
    conninfo = psycopg.conninfo.make_conninfo(dsn, application_name=appname)
    app = Flask(appname)
    if mode == "reqconn":
        app.config.update(
            REQCONN_CONNINFO=conninfo,
            REQCONN_MIN_SIZE=0,
            REQCONN_MAX_SIZE=pool_size,
            REQCONN_TIMEOUT=timeout,
            REQCONN_EXEMPT_ENDPOINTS=["stats", "nodb"],
            SQLALCHEMY_DATABASE_URI="postgresql+psycopg://",
            SQLALCHEMY_ENGINE_OPTIONS=engine_options(),
        )
        reqconn.init_app(app)
    elif mode == "native":
        app.config.update(
            SQLALCHEMY_DATABASE_URI="postgresql+psycopg://",
            SQLALCHEMY_ENGINE_OPTIONS={
                "creator": lambda: psycopg.connect(conninfo),
                "pool_size": pool_size,
                "max_overflow": 0,
                "pool_timeout": timeout,
            },
        )
    else:
        raise ValueError(f"FSQLA_MODE must be 'reqconn' or 'native', not {mode!r}")
    db.init_app(app)

    @app.get("/")
    def index() -> str:
        _ran("index")
        return str(db.session.scalar(select(func.count()).select_from(Item)))

    @app.post("/items")
    def add() -> tuple[str, int]:
        item = Item(name=request.args["name"])
        db.session.add(item)
        if request.args.get("commit", "1") == "1":
            db.session.commit()
        else:
            db.session.flush()
        return str(item.id), 201

    @app.get("/items/<int:item_id>")
    def get_item(item_id: int) -> dict[str, Any]:
        item = db.get_or_404(Item, item_id)
        return {"id": item.id, "name": item.name}

    @app.get("/page")
    def page() -> dict[str, Any]:
        result = db.paginate(select(Item).order_by(Item.id), per_page=2)
        return {"total": result.total, "names": [i.name for i in result.items]}

    @app.get("/feed")
    def feed() -> Response:
        _ran("feed")

        def ticks() -> Iterator[str]:
            for i in range(FEED_TICKS):
                now = db.session.execute(text("SELECT clock_timestamp()")).scalar_one()
                yield f"data: {i} {now.isoformat()}\n\n"
                time.sleep(FEED_EVERY)

        return Response(stream_with_context(ticks()), mimetype="text/event-stream")

    @app.get("/sleepfeed")
    def sleepfeed() -> Response:
        def body() -> Iterator[str]:
            yield "started\n"
            db.session.execute(text("SELECT pg_sleep(30)"))
            yield "done\n"

        return Response(stream_with_context(body()), mimetype="text/plain")

    @app.get("/slow")
    def slow() -> str:
        _ran("slow")
        db.session.execute(text("SELECT pg_sleep(:s)"), {"s": float(request.args["s"])})
        return "slow"

    @app.get("/health")
    def health() -> str:
        db.session.execute(text("SELECT 1"))
        return "ok"

    @app.get("/select1")
    def select1() -> str:
        return str(db.session.execute(text("SELECT 1")).scalar())

    @app.get("/read")
    def read() -> dict[str, Any]:
        rows = db.session.scalars(select(Item).order_by(Item.id).limit(10)).all()
        return {"names": [row.name for row in rows]}

    @app.get("/nodb")
    def nodb() -> str:
        return "ok"

    @app.get("/stats")
    def stats() -> Response:
        with _lock:
            views = dict(_views)
        if mode == "reqconn":
            return jsonify({**reqconn.stats(), "views": views})
        pool: Any = db.engine.pool
        return jsonify(pid=os.getpid(), checked_out=pool.checkedout(), views=views,
                       pool=pool.status())  # fmt: skip

    return app
