"""The naive way: a psycopg pool of our own, one connection per request.

This is how many Flask apps hand out PostgreSQL connections, and how the app
that led to flask-reqconn did it. It works in every test and every normal
request. It leaks one pool connection each time a client stops reading the
``/feed`` stream before the end:

* the stream needs the connection after the view has returned, so
  ``give_back`` leaves the streams' connections alone and the generator gives
  the connection back itself, after its last line;
* when the client goes away, the WSGI server's next write fails and it closes
  the generator: ``GeneratorExit`` is raised at the ``yield``, and the
  ``putconn`` after the loop never runs. The pool still counts the
  connection as checked out, and never opens a replacement. Nothing refers
  to the connection any more, so the garbage collector closes it: PostgreSQL
  shows no session for it, the leak is visible only in the pool's counters
  (``/stats``).

Once ``POOL_SIZE`` streams have been dropped the pool is empty: every request,
``/health`` included, waits for a connection and fails after ``POOL_TIMEOUT``
seconds.

It also lets clients that stall take its connections, because the connection is
taken in ``before_request``, before anything else happens:

* ``POST /upload`` reads its body in the view. The WSGI server reads the body
  as the view asks for it, so a client that sends its headers and then one byte
  a second, or nothing at all, holds a pool connection for as long as it likes;
  a handful of them empty the pool;
* ``/export`` streams a large body (``EXPORT_CHUNKS`` lines of ``EXPORT_PAD``
  bytes, a query for each): a client that reads the first lines and then stops
  reading blocks the server's writes, and the stream holds its connection for as
  long as the client keeps the socket open (then it is lost, as above).

Configured from the environment: ``DATABASE_URL`` (required), ``POOL_SIZE``
(default 2) and ``POOL_TIMEOUT`` (seconds to wait for a connection, default 5).

Do not copy this; see ``examples/reqconn_app.py`` for the same app with
flask-reqconn. Run it with::

    DATABASE_URL=postgresql://app@127.0.0.1/app \\
        gunicorn -k gthread --threads 4 'examples.naive_app:create_app()'
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
from flask import Flask, Response, current_app, g, request
from psycopg_pool import ConnectionPool

#: Lines per ``/feed`` stream, and the pause between them.
FEED_TICKS = 50
FEED_EVERY = 0.02
#: Lines of an ``/export`` and the padding of each: 12.8 MB, more than socket buffers hold.
EXPORT_CHUNKS = 400
EXPORT_PAD = 32 * 1024

_pool: ConnectionPool[psycopg.Connection[Any]] | None = None
_pool_lock = threading.Lock()


def get_pool() -> ConnectionPool[psycopg.Connection[Any]]:
    """The process's pool, opened on first use.

    Opened in the worker, not at import: a pool opened before gunicorn forks
    would be shared, broken, by every worker.
    """
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ConnectionPool(
                current_app.config["DATABASE_URL"],
                min_size=1,
                max_size=current_app.config["POOL_SIZE"],
                timeout=current_app.config["POOL_TIMEOUT"],
                open=True,
            )
        return _pool


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["DATABASE_URL"] = os.environ["DATABASE_URL"]
    app.config["POOL_SIZE"] = int(os.environ.get("POOL_SIZE", "2"))
    app.config["POOL_TIMEOUT"] = float(os.environ.get("POOL_TIMEOUT", "5"))

    @app.before_request
    def take_connection() -> None:
        if request.endpoint != "stats":
            g.conn = get_pool().getconn()

    @app.after_request
    def give_back(response: Response) -> Response:
        # A streamed body still needs the connection: the stream gives it back.
        if not g.get("stream_gives_back"):
            conn = g.pop("conn", None)
            if conn is not None:
                get_pool().putconn(conn)
        return response

    @app.get("/")
    def index() -> dict[str, Any]:
        row = g.conn.execute("SELECT clock_timestamp(), pg_backend_pid()").fetchone()
        return {"time": row[0].isoformat(), "backend": row[1]}

    @app.get("/feed")
    def feed() -> Response:
        pool = get_pool()
        conn = g.conn
        g.stream_gives_back = True

        def ticks() -> Iterator[str]:
            for i in range(FEED_TICKS):
                row = conn.execute("SELECT clock_timestamp()").fetchone()
                yield f"data: {i} {row[0].isoformat()}\n\n"
                time.sleep(FEED_EVERY)
            pool.putconn(conn)  # never reached when the client leaves early

        return Response(ticks(), mimetype="text/event-stream")

    @app.post("/upload")
    def upload() -> dict[str, Any]:
        data = request.get_data()  # the connection is already taken while this waits
        row = g.conn.execute("SELECT %s::int, pg_backend_pid()", (len(data),)).fetchone()
        return {"size": row[0], "backend": row[1]}

    @app.get("/export")
    def export() -> Response:
        pool = get_pool()
        conn = g.conn
        g.stream_gives_back = True

        def lines() -> Iterator[str]:
            for i in range(EXPORT_CHUNKS):
                row = conn.execute("SELECT clock_timestamp()").fetchone()
                yield f"{i},{row[0].isoformat()},{'x' * EXPORT_PAD}\n"
            pool.putconn(conn)  # never reached when the client leaves early

        return Response(lines(), mimetype="text/csv")

    @app.get("/health")
    def health() -> str:
        g.conn.execute("SELECT 1")
        return "ok"

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        """The pool's own counters, for monitoring; uses no connection."""
        pool_stats = get_pool().get_stats()
        checked_out = pool_stats["pool_size"] - pool_stats["pool_available"]
        return {"pid": os.getpid(), "checked_out": checked_out, "pool": pool_stats}

    return app
