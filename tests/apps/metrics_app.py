"""An app with Prometheus metrics in multiprocess mode, and its gunicorn config.

Used as ``--config python:tests.apps.metrics_app`` (the hooks below) and
``tests.apps.metrics_app:create_app()``.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, request

from flask_reqconn import ReqConn, get_conn
from flask_reqconn.integrations.prometheus import PrometheusMetrics


def create_app() -> Flask:
    app = Flask(os.environ.get("RC_APPNAME", "metrics_app"))
    app.config["REQCONN_CONNINFO"] = os.environ["RC_DSN"]
    app.config["REQCONN_MIN_SIZE"] = 0
    app.config["REQCONN_MAX_SIZE"] = 2
    ReqConn(app)
    PrometheusMetrics().init_app(app)

    @app.get("/pid")
    def pid() -> str:
        get_conn().execute("select pg_sleep(%s)", (float(request.args.get("s", "0")),))
        return str(os.getpid())

    return app


# gunicorn config hooks
def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def post_worker_init(worker: Any) -> None:
    worker.log.info("reqconn-tests: worker %s ready", worker.pid)
