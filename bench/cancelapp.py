"""The app of ``bench/cancel.py``: a long query that records when it was cancelled."""

from __future__ import annotations

import os
import time

import psycopg
from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

from flask_reqconn import ReqConn, get_conn

reqconn = ReqConn()


def create_app() -> Flask:
    app = Flask("bench_cancel")
    app.config["REQCONN_CONNINFO"] = os.environ["RC_DSN"]
    app.config["REQCONN_MIN_SIZE"] = int(os.environ.get("RC_POOL", "4"))
    app.config["REQCONN_MAX_SIZE"] = int(os.environ.get("RC_POOL", "4"))
    app.config["REQCONN_CANCEL_ON_DISCONNECT"] = os.environ.get("RC_CANCEL", "safe")
    reqconn.init_app(app)
    log_path = os.environ.get("RC_CANCEL_LOG", os.devnull)

    @app.get("/sleep")
    def sleep() -> str:
        try:
            get_conn().execute("select pg_sleep(%s)", (float(request.args.get("s", "30")),))
        except psycopg.errors.QueryCanceled:
            with open(log_path, "a") as log:
                log.write(f"{request.args['id']} {time.time():.6f}\n")
            raise
        return "slept"

    @app.get("/one")
    def one() -> str:
        return str(get_conn().execute("select 1").fetchone()[0])

    @app.get("/_stats")
    @reqconn.exempt
    def stats() -> ResponseReturnValue:
        return jsonify(reqconn.stats())

    return app
