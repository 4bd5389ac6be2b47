"""The same app as ``examples/naive_app.py``, written with flask-reqconn.

Every request gets one connection from the pool (checked out before the view
runs) and gives it back whatever happens: at the end of the request, when a
``/feed`` or ``/export`` stream ends or its client drops it, when the view
raises. A request whose client has already gone is answered 499 without running
the view. A ``POST /upload`` gets its connection only once its body is in, so a
client that sends its body slowly, or stops, holds none; one that stops reading
an ``/export`` holds its connection until it leaves or ``REQCONN_MAX_HOLD``
(``MAX_HOLD``, default 120 s) takes it back.

Configured from the environment: ``DATABASE_URL`` (required), ``POOL_SIZE``
(default 2), ``POOL_TIMEOUT`` (seconds to wait for a connection, default 5) and
``MAX_HOLD`` (``REQCONN_MAX_HOLD``, if set).

``/stats`` shows flask-reqconn's counters for this worker process; it is
exempt from the checkout, so it answers even when the pool is empty. Point
the abort storm at it::

    export DATABASE_URL=postgresql://app@127.0.0.1/app
    gunicorn -k gthread --threads 4 'examples.reqconn_app:create_app()' &
    flask --app examples.reqconn_app reqconn storm http://127.0.0.1:8000/ \\
        --stream-path /feed --health-path /health --stats-url /stats

and the clients that stall at it::

    flask --app examples.reqconn_app reqconn storm http://127.0.0.1:8000/ \\
        --abort-styles stalled --body-path /upload --stream-path /export \\
        --stats-url /stats
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, request, stream_with_context

from flask_reqconn import ReqConn, get_conn

#: Lines per ``/feed`` stream, and the pause between them.
FEED_TICKS = 50
FEED_EVERY = 0.02
#: Lines of an ``/export`` and the padding of each: 12.8 MB, more than socket buffers hold.
EXPORT_CHUNKS = 400
EXPORT_PAD = 32 * 1024

reqconn = ReqConn()


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["REQCONN_CONNINFO"] = os.environ["DATABASE_URL"]
    app.config["REQCONN_MAX_SIZE"] = int(os.environ.get("POOL_SIZE", "2"))
    app.config["REQCONN_TIMEOUT"] = float(os.environ.get("POOL_TIMEOUT", "5"))
    if os.environ.get("MAX_HOLD"):
        app.config["REQCONN_MAX_HOLD"] = float(os.environ["MAX_HOLD"])
    reqconn.init_app(app)

    @app.get("/")
    def index() -> dict[str, Any]:
        row = get_conn().execute("SELECT clock_timestamp(), pg_backend_pid()").fetchone()
        assert row is not None
        return {"time": row[0].isoformat(), "backend": row[1]}

    @app.get("/feed")
    def feed() -> Response:
        def ticks() -> Iterator[str]:
            for i in range(FEED_TICKS):
                row = get_conn().execute("SELECT clock_timestamp()").fetchone()
                assert row is not None
                yield f"data: {i} {row[0].isoformat()}\n\n"
                time.sleep(FEED_EVERY)

        return Response(stream_with_context(ticks()), mimetype="text/event-stream")

    @app.post("/upload")
    def upload() -> dict[str, Any]:
        data = request.get_data()  # read before the checkout: no connection while it came
        row = get_conn().execute("SELECT %s::int, pg_backend_pid()", (len(data),)).fetchone()
        assert row is not None
        return {"size": row[0], "backend": row[1]}

    @app.get("/export")
    def export() -> Response:
        def lines() -> Iterator[str]:
            for i in range(EXPORT_CHUNKS):
                row = get_conn().execute("SELECT clock_timestamp()").fetchone()
                assert row is not None
                yield f"{i},{row[0].isoformat()},{'x' * EXPORT_PAD}\n"

        return Response(stream_with_context(lines()), mimetype="text/csv")

    @app.get("/health")
    def health() -> str:
        get_conn().execute("SELECT 1")
        return "ok"

    @app.get("/stats")
    @reqconn.exempt
    def stats() -> dict[str, Any]:
        return reqconn.stats()

    return app
