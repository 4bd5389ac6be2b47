"""The app ``bench/faults.py``, ``bench/soak.py`` and their tests serve under gunicorn.

``gunicorn 'tests.apps.faultapp:create_app()'``, configured from the environment:

``FAULT_VARIANT``
    ``reqconn``: flask-reqconn with today's defaults (``get_conn()`` in the view);
    ``bare``: psycopg_pool by hand, ``with pool.connection()`` in the view;
    ``check``: the same with ``check=ConnectionPool.check_connection``.
``FAULT_DSN``
    conninfo of the PostgreSQL (required).
``FAULT_APPNAME``
    ``application_name`` of the pool's connections (default ``fault_<variant>``), by which
    the faults find the backends to terminate.
``FAULT_MAX_HOLD``
    (reqconn) ``REQCONN_MAX_HOLD`` in seconds (default: unset, the library's default).

Every variant: a pool of 4 (min = max, so every variant has 4 idle connections to lose),
a checkout timeout of 2 s (``REQCONN_TIMEOUT = 2`` / ``timeout=2``). Views:

``/select1``   ``SELECT 1``
``/sleep?s=``  ``SELECT pg_sleep(s)``
``/stream?n=`` (reqconn) a streamed body of *n* chunks, one query each
``/stats``     the pool's counters: ``ReqConn.stats()``, or ``{"pool": get_stats()}``
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, jsonify, request, stream_with_context

VARIANTS = ("reqconn", "bare", "check")
POOL_SIZE = 4
TIMEOUT = 2.0


def create_app(variant: str | None = None) -> Flask:
    """Build the app of *variant* (default ``$FAULT_VARIANT``)."""
    variant = variant or os.environ.get("FAULT_VARIANT", "reqconn")
    if variant not in VARIANTS:
        raise ValueError(f"FAULT_VARIANT={variant!r}: choose from {', '.join(VARIANTS)}")
    dsn = os.environ["FAULT_DSN"]
    appname = os.environ.get("FAULT_APPNAME") or f"fault_{variant}"
    app = Flask(f"fault_{variant}")
    if variant == "reqconn":
        _reqconn(app, dsn, appname)
    else:
        _bare(app, dsn, appname, check=variant == "check")
    return app


def _seconds() -> float:
    return min(60.0, max(0.0, float(request.args.get("s", "1"))))


def _reqconn(app: Flask, dsn: str, appname: str) -> None:
    from flask_reqconn import ReqConn, get_conn

    app.config.update(
        REQCONN_CONNINFO=dsn,
        REQCONN_MIN_SIZE=POOL_SIZE,
        REQCONN_MAX_SIZE=POOL_SIZE,
        REQCONN_TIMEOUT=TIMEOUT,
        REQCONN_CONNECT_ARGS={"application_name": appname},
        REQCONN_EXEMPT_ENDPOINTS=["stats"],
    )
    if os.environ.get("FAULT_MAX_HOLD"):
        app.config["REQCONN_MAX_HOLD"] = float(os.environ["FAULT_MAX_HOLD"])
    reqconn = ReqConn(app)

    @app.get("/select1")
    def select1() -> str:
        row = get_conn().execute("SELECT 1").fetchone()
        return str(row[0]) if row else ""

    @app.get("/sleep")
    def sleep() -> str:
        get_conn().execute("SELECT pg_sleep(%s)", (_seconds(),))
        return "slept"

    @app.get("/stream")
    def stream() -> Response:
        chunks = min(100, int(request.args.get("n", "10")))

        def body() -> Iterator[str]:
            for i in range(chunks):
                get_conn().execute("SELECT pg_sleep(0.01)")
                yield f"chunk {i}\n" + "x" * 16384 + "\n"

        return Response(stream_with_context(body()), mimetype="text/plain")

    @app.get("/stats")
    def stats() -> Response:
        return jsonify(reqconn.stats())


def _bare(app: Flask, dsn: str, appname: str, *, check: bool) -> None:
    from psycopg_pool import ConnectionPool

    # Opened here, in the worker (gunicorn imports the app after forking, no --preload).
    pool: ConnectionPool[Any] = ConnectionPool(
        dsn,
        min_size=POOL_SIZE,
        max_size=POOL_SIZE,
        timeout=TIMEOUT,
        kwargs={"application_name": appname},
        check=ConnectionPool.check_connection if check else None,
        name=appname,
        open=True,
    )

    @app.get("/select1")
    def select1() -> str:
        with pool.connection() as conn:
            row = conn.execute("SELECT 1").fetchone()
        return str(row[0]) if row else ""

    @app.get("/sleep")
    def sleep() -> str:
        with pool.connection() as conn:
            conn.execute("SELECT pg_sleep(%s)", (_seconds(),))
        return "slept"

    @app.get("/stats")
    def stats() -> Response:
        return jsonify({"pid": os.getpid(), "pool": pool.get_stats()})
