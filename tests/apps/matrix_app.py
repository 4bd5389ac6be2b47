"""``examples/reqconn_app.py`` plus two routes the server matrix needs to look inside.

``/sleep?s=N``
    Runs ``pg_sleep(N)`` on the request's connection.
``/wait-func``
    The name of the function psycopg waits on sockets with in this process
    (``wait_c`` blocks a gevent hub; the others cooperate once ``select`` is patched).
"""

from __future__ import annotations

from flask import Flask, request
from psycopg import waiting

from examples.reqconn_app import create_app as create_example_app
from flask_reqconn import get_conn


def create_app() -> Flask:
    app = create_example_app()

    @app.get("/sleep")
    def sleep() -> str:
        get_conn().execute("SELECT pg_sleep(%s)", (float(request.args.get("s", "1")),))
        return "slept"

    @app.get("/wait-func")
    def wait_func() -> str:
        return str(getattr(waiting.wait, "__name__", waiting.wait))

    return app
