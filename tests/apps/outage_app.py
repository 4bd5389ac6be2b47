"""Streamed responses whose database connection is lost, served by gunicorn in tests/test_lost.py.

``gunicorn 'tests.apps.outage_app:create_app()'``, configured from the environment:
``OUTAGE_DSN`` (required), ``OUTAGE_APPNAME`` (``application_name`` of the pool's
connections, by which the test finds the backends to terminate). A pool of 2,
``REQCONN_RETRY_AFTER = 7``.

``/first``      a streamed body whose first query (``pg_sleep(30)``) runs before its first
                chunk: a lost connection there can still be answered 503
``/bp/first``   the same in a blueprint with its own handler for ``DatabaseUnavailable``
                (JSON, header ``X-Handled``)
``/late``       a first chunk, then ``pg_sleep(30)``: a lost connection there cuts the
                stream off
``/select1``    ``SELECT 1``
``/stats``      ``ReqConn.stats()``
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, stream_with_context

from flask_reqconn import DatabaseUnavailable, ReqConn, get_conn

RETRY_AFTER = 7


def create_app() -> Flask:
    app = Flask("outage_app")
    app.config.update(
        REQCONN_CONNINFO=os.environ["OUTAGE_DSN"],
        REQCONN_MIN_SIZE=0,
        REQCONN_MAX_SIZE=2,
        REQCONN_TIMEOUT=5.0,
        REQCONN_RETRY_AFTER=RETRY_AFTER,
        REQCONN_CONNECT_ARGS={"application_name": os.environ.get("OUTAGE_APPNAME", "outage")},
        REQCONN_EXEMPT_ENDPOINTS=["stats"],
    )
    reqconn = ReqConn(app)

    def first() -> Response:
        def body() -> Iterator[str]:
            get_conn().execute("SELECT pg_sleep(30)")
            yield "never\n"

        return Response(stream_with_context(body()), mimetype="text/plain")

    app.add_url_rule("/first", "first", first)
    bp = Blueprint("bp", __name__, url_prefix="/bp")
    bp.add_url_rule("/first", "first", first)

    @bp.errorhandler(DatabaseUnavailable)
    def unavailable(exc: DatabaseUnavailable) -> tuple[dict[str, Any], int, dict[str, str]]:
        return {"error": "database", "pool": exc.pool_name}, 503, {"X-Handled": "1"}

    app.register_blueprint(bp)

    @app.get("/late")
    def late() -> Response:
        def body() -> Iterator[str]:
            yield "first chunk\n"
            get_conn().execute("SELECT pg_sleep(30)")
            yield "never\n"

        return Response(stream_with_context(body()), mimetype="text/plain")

    @app.get("/select1")
    def select1() -> str:
        row = get_conn().execute("SELECT 1").fetchone()
        return str(row[0]) if row else ""

    @app.get("/stats")
    def stats() -> Response:
        return jsonify(reqconn.stats())

    return app
