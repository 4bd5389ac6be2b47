"""The app tests/test_failover.py serves under gunicorn: writes, reads, stats.

``gunicorn 'tests.apps.failoverapp:create_app()'``, configured from the environment:

``FAILOVER_DSN``
    conninfo of the default pool (required): in the test, both servers and
    ``target_session_attrs=read-write``.
``FAILOVER_READ_DSN``
    (optional) conninfo of a read pool ``read``, the ``REQCONN_READ_POOL``: in the test,
    standby first, then primary, with ``target_session_attrs=prefer-standby``.
``FAILOVER_APPNAME``
    ``application_name`` of the pools' connections.

Pools of 4 (min = max), checkout timeout 2 s, as in tests/apps/faultapp.py. Views:

``/write``  insert a row into ``failover_writes`` and commit; answers the server's port and
            ``pg_is_in_recovery()`` (a standby refuses the insert: a 500)
``/read``   read-only view (the read pool when there is one): the server's port and
            ``pg_is_in_recovery()``
``/stats``  ``ReqConn.stats()``
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, Response, jsonify

POOL_SIZE = 4
TIMEOUT = 2.0
TABLE = "failover_writes"


def create_app() -> Flask:
    from flask_reqconn import ReqConn, get_conn

    app = Flask("failover")
    app.config.update(
        REQCONN_CONNINFO=os.environ["FAILOVER_DSN"],
        REQCONN_MIN_SIZE=POOL_SIZE,
        REQCONN_MAX_SIZE=POOL_SIZE,
        REQCONN_TIMEOUT=TIMEOUT,
        REQCONN_CONNECT_ARGS={"application_name": os.environ.get("FAILOVER_APPNAME", "failover")},
        REQCONN_EXEMPT_ENDPOINTS=["stats"],
    )
    if os.environ.get("FAILOVER_READ_DSN"):
        app.config["REQCONN_POOLS"] = {"read": {"CONNINFO": os.environ["FAILOVER_READ_DSN"]}}
        app.config["REQCONN_READ_POOL"] = "read"
    reqconn = ReqConn(app)

    def where(conn: Any) -> dict[str, Any]:
        row = conn.execute("SELECT inet_server_port(), pg_is_in_recovery()").fetchone()
        return {"port": row[0], "in_recovery": row[1]}

    @app.get("/write")
    def write() -> Response:
        conn = get_conn()
        conn.execute(f"INSERT INTO {TABLE} (port) VALUES (inet_server_port())")
        answer = where(conn)
        conn.commit()
        return jsonify(answer)

    @app.get("/read")
    @reqconn.read_only
    def read() -> Response:
        return jsonify(where(get_conn()))

    @app.get("/stats")
    def stats() -> Response:
        return jsonify(reqconn.stats())

    return app
