"""The app the end-to-end tests serve under real servers.

Configured from the environment so one module serves every scenario:
``RC_DSN`` (required), ``RC_APPNAME``, ``RC_MAX_SIZE``, ``RC_TIMEOUT``,
``RC_CHECKOUT``, ``RC_SESSION_SETTINGS`` (``name=value,name=value``),
``RC_CANCEL`` (the cancel-on-disconnect policy), ``RC_EOF_MEANS_GONE`` (``1``/``0``),
``RC_MAX_HOLD``, ``RC_BODY_BUFFER``, ``RC_BODY_TIMEOUT``, ``RC_LOG`` (a level: log to
stderr, as an app configures its logging),
and ``RC_OPEN_IN_MASTER=1`` to use the pool while the app is created (to prove that
a pool opened before gunicorn forks does not hurt the workers).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, jsonify, request, stream_with_context

from flask_reqconn import ReqConn, get_conn

reqconn = ReqConn()


def create_app() -> Flask:
    if os.environ.get("RC_LOG"):
        logging.basicConfig(
            level=os.environ["RC_LOG"], format="%(levelname)s %(name)s: %(message)s"
        )
    app = Flask(os.environ.get("RC_APPNAME", "reqconn_e2e"))
    app.config["REQCONN_CONNINFO"] = os.environ["RC_DSN"]
    app.config["REQCONN_MIN_SIZE"] = 0
    app.config["REQCONN_MAX_SIZE"] = int(os.environ.get("RC_MAX_SIZE", "2"))
    app.config["REQCONN_TIMEOUT"] = float(os.environ.get("RC_TIMEOUT", "5"))
    app.config["REQCONN_CHECKOUT"] = os.environ.get("RC_CHECKOUT", "eager")
    app.config["REQCONN_EXEMPT_ENDPOINTS"] = ["stats", "health"]
    app.config["REQCONN_CANCEL_ON_DISCONNECT"] = os.environ.get("RC_CANCEL", "safe")
    app.config["REQCONN_EOF_MEANS_GONE"] = os.environ.get("RC_EOF_MEANS_GONE", "1") == "1"
    app.config["REQCONN_PGBOUNCER"] = os.environ.get("RC_PGBOUNCER") == "1"
    if os.environ.get("RC_MAX_HOLD"):
        app.config["REQCONN_MAX_HOLD"] = float(os.environ["RC_MAX_HOLD"])
    if os.environ.get("RC_BODY_BUFFER"):
        app.config["REQCONN_BODY_BUFFER"] = int(os.environ["RC_BODY_BUFFER"])
    if os.environ.get("RC_BODY_TIMEOUT"):
        app.config["REQCONN_BODY_TIMEOUT"] = float(os.environ["RC_BODY_TIMEOUT"])
    settings = os.environ.get("RC_SESSION_SETTINGS", "")
    app.config["REQCONN_SESSION_SETTINGS"] = dict(
        item.split("=", 1) for item in settings.split(",") if item
    )
    reqconn.init_app(app)

    if os.environ.get("RC_OPEN_IN_MASTER") == "1":
        with reqconn.connection(app=app) as conn:
            conn.execute("select 1")

    @app.get("/")
    def index() -> str:
        return str(get_conn().execute("select 1").fetchone()[0])

    @app.get("/pid")
    def pid() -> dict[str, int]:
        backend = get_conn().execute("select pg_backend_pid()").fetchone()[0]
        return {"worker": os.getpid(), "backend": backend}

    @app.route("/slow", methods=["GET", "POST"])
    def slow() -> str:
        seconds = float(request.args.get("s", "1"))
        get_conn().execute("select pg_sleep(%s)", (seconds,))
        return "slept"

    @app.get("/hold")
    def hold() -> str:
        get_conn().execute("select 1")
        # in Python, holding the connection, for s seconds or until GET /hold/end
        _HOLD_END.wait(float(request.args.get("s", "1")))
        return "held"

    @app.get("/hold/end")
    def hold_end() -> str:
        _HOLD_END.set()  # once: a worker's holds end at once from then on
        return "ended"

    @app.get("/stream")
    def stream() -> Response:
        chunks = int(request.args.get("n", "10"))
        pause = float(request.args.get("s", "0.2"))

        @stream_with_context
        def rows() -> Iterator[str]:
            for i in range(chunks):
                get_conn().execute("select pg_sleep(%s)", (pause,))
                yield f"chunk {i}\n" + "x" * 16384 + "\n"

        return Response(rows(), mimetype="text/plain")

    @app.post("/upload")
    def upload() -> dict[str, Any]:
        size = len(request.get_data())
        row = get_conn().execute("select %s::int, pg_backend_pid()", (size,)).fetchone()
        return {"size": row[0], "backend": row[1]}

    @app.post("/upload-stream")
    def upload_stream() -> dict[str, Any]:
        size = 0
        while chunk := request.stream.read(4096):
            size += len(chunk)
        return {"size": get_conn().execute("select %s::int", (size,)).fetchone()[0]}

    @app.post("/form")
    def form() -> dict[str, Any]:
        upload = request.files["file"].read()
        get_conn().execute("select 1")
        return {"name": request.form["name"], "file": len(upload)}

    @app.get("/keep")
    def keep() -> str:
        _KEPT.append(get_conn())  # a connection kept past its request
        return "kept"

    @app.get("/use-kept")
    def use_kept() -> str:
        table = os.environ["RC_TABLE"]
        _KEPT[-1].execute(f"insert into {table} values ('stray')")  # no get_conn()
        return "wrote"

    @app.get("/spawn")
    def spawn() -> str:
        conn, table = get_conn(), os.environ["RC_TABLE"]

        def later() -> None:  # a thread that outlives its request
            time.sleep(0.3)
            try:
                conn.execute(f"insert into {table} values ('thread')")
                conn.commit()
                _KEPT.append("committed")
            except Exception as exc:
                _KEPT.append(f"{type(exc).__name__}: {exc}")

        threading.Thread(target=later).start()
        return "spawned"

    @app.get("/kept")
    def kept() -> dict[str, str]:
        return {"last": str(_KEPT[-1])}

    @app.post("/commit")
    def commit() -> str:
        conn = get_conn()
        conn.execute(f"insert into {os.environ['RC_TABLE']} values ('own')")
        conn.commit()
        return "committed"

    @app.get("/health")
    def health() -> str:
        return "ok"

    @app.get("/_stats")
    def stats() -> Any:
        data = reqconn.stats()
        data["worker_started"] = _STARTED
        return jsonify(data)

    return app


_STARTED = time.time()
_KEPT: list[Any] = []
_HOLD_END = threading.Event()  # set by GET /hold/end
