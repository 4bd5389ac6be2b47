"""An app of ``async def`` views, for the end-to-end tests of tests/test_async.py.

Flask runs each coroutine through asgiref's ``async_to_sync``, in a thread of its own
with the request's context copied. Every view here is ``async def``, except
``/_stats``. Configured from the environment: ``RC_DSN`` (required), ``RC_APPNAME``,
``RC_MAX_SIZE``, ``RC_TIMEOUT``, ``RC_CHECKOUT``, ``RC_CANCEL``,
``RC_LEAK_THRESHOLD``, ``RC_TRANSACTION``, ``RC_TABLE`` (a table of one text column
for the writes) and ``RC_LOG`` (a level: log to stderr, as an app configures its
logging).

Each response carries ``X-Serving-Thread``, the thread serving the request (set in
``after_request``, which runs there); the views that say where they ran answer with
the coroutine's thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any

from flask import Flask, jsonify, request
from werkzeug.wrappers import Response

from flask_reqconn import ConnectionReleased, ReqConn, get_conn

reqconn = ReqConn()
_KEPT: list[Any] = []


def create_app() -> Flask:
    if os.environ.get("RC_LOG"):
        logging.basicConfig(
            level=os.environ["RC_LOG"], format="%(levelname)s %(name)s: %(message)s"
        )
    app = Flask(os.environ.get("RC_APPNAME", "reqconn_async"))
    app.config["REQCONN_CONNINFO"] = os.environ["RC_DSN"]
    app.config["REQCONN_MIN_SIZE"] = 0
    app.config["REQCONN_MAX_SIZE"] = int(os.environ.get("RC_MAX_SIZE", "2"))
    app.config["REQCONN_TIMEOUT"] = float(os.environ.get("RC_TIMEOUT", "5"))
    app.config["REQCONN_CHECKOUT"] = os.environ.get("RC_CHECKOUT", "eager")
    # use_kept takes no connection of its own, eager or lazy: with a pool of 1 it would
    # be the kept one again (the request's own, then)
    app.config["REQCONN_EXEMPT_ENDPOINTS"] = ["stats", "use_kept"]
    app.config["REQCONN_CANCEL_ON_DISCONNECT"] = os.environ.get("RC_CANCEL", "safe")
    app.config["REQCONN_TRANSACTION"] = os.environ.get("RC_TRANSACTION", "rollback")
    if os.environ.get("RC_LEAK_THRESHOLD"):
        app.config["REQCONN_LEAK_THRESHOLD"] = float(os.environ["RC_LEAK_THRESHOLD"])
    reqconn.init_app(app)

    @app.after_request
    def serving_thread(response: Response) -> Response:
        response.headers["X-Serving-Thread"] = str(threading.get_ident())
        return response

    @app.get("/")
    async def index() -> str:
        await asyncio.sleep(0)
        return str(get_conn().execute("select 1").fetchone()[0])

    @app.get("/slow")
    async def slow() -> str:
        await asyncio.sleep(0)
        get_conn().execute("select pg_sleep(%s)", (float(request.args.get("s", "1")),))
        return "slept"

    @app.get("/late")
    async def late() -> str:
        await asyncio.sleep(float(request.args.get("s", "1")))  # no connection yet (lazy)
        get_conn().execute("select 1")
        return "late"

    @app.get("/hold")
    async def hold() -> dict[str, int]:
        get_conn().execute("select 1")
        await asyncio.sleep(float(request.args.get("s", "1")))  # holding the connection
        return {"coroutine_thread": threading.get_ident()}

    @app.get("/keep")
    async def keep() -> str:
        _KEPT.append(get_conn())  # a connection kept past its request
        return "kept"

    @app.get("/use-kept")
    async def use_kept() -> dict[str, str]:
        try:
            _KEPT[-1].execute(f"insert into {os.environ['RC_TABLE']} values ('stray')")
        except ConnectionReleased as exc:
            return {"refused": str(exc)}
        return {"refused": ""}

    @app.get("/insert")
    async def insert() -> tuple[str, int]:
        what = request.args.get("what", "row")
        get_conn().execute(f"insert into {os.environ['RC_TABLE']} values (%s)", (what,))
        return "inserted", int(request.args.get("status", "200"))  # no commit of its own

    @app.get("/_stats")
    def stats() -> Any:
        return jsonify(reqconn.stats())

    return app
