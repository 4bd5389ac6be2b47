"""An opt-in blueprint with liveness, readiness and stats endpoints.

``/health`` never touches the pool, so it answers even when every connection
is taken. ``/ready`` takes a connection with a short timeout of its own and
runs ``select 1``: 503 when the pool is exhausted, the database refuses
connections, or it is down.
``/stats`` returns :meth:`ReqConn.stats` of the answering process. All three
are exempt from the request checkout and answer JSON.
"""

from __future__ import annotations

import time
import typing as t

import psycopg
from flask import Blueprint, Flask, current_app, jsonify
from psycopg_pool import PoolTimeout, TooManyRequests

from .errors import DatabaseRefused, PoolExhausted

if t.TYPE_CHECKING:
    from werkzeug.wrappers import Response

    from .extension import ReqConn

#: Seconds ``/ready`` waits for a connection and for ``select 1``.
READY_TIMEOUT = 1.0


def health_blueprint(
    reqconn: ReqConn, *, name: str = "reqconn_health", ready_timeout: float = READY_TIMEOUT
) -> Blueprint:
    """Build the blueprint; register it with the ``url_prefix`` you want.

    ::

        app.register_blueprint(health_blueprint(reqconn), url_prefix="/_")

    :param reqconn: the extension instance the app was set up with.
    :param name: the blueprint name (change it to register two).
    :param ready_timeout: seconds ``/ready`` may spend waiting and querying.
    """
    bp = Blueprint(name, __name__)
    reqconn.exempt(bp)

    @bp.get("/health")
    def health() -> Response:
        return jsonify(status="ok")

    @bp.get("/ready")
    def ready() -> tuple[Response, int]:
        app = t.cast(Flask, current_app._get_current_object())  # type: ignore[attr-defined]
        stats = reqconn.stats(app)
        summary = {
            "checked_out": stats["checked_out"],
            "pools": {name: p["pool"] for name, p in stats["pools"].items()},
        }
        started = time.monotonic()
        try:
            with reqconn.connection(app=app, timeout=ready_timeout) as conn:
                conn.execute(
                    "select set_config('statement_timeout', %s, true)",
                    (f"{int(ready_timeout * 1000)}ms",),
                )
                conn.execute("select 1")
        except DatabaseRefused as exc:
            reason = f"database refusing connections: {exc.cause}"
            return jsonify(status="unavailable", reason=reason, **summary), 503
        except (PoolExhausted, PoolTimeout, TooManyRequests):
            return jsonify(status="unavailable", reason="pool exhausted", **summary), 503
        except psycopg.Error as exc:
            reason = f"database error: {type(exc).__name__}"
            return jsonify(status="unavailable", reason=reason, **summary), 503
        elapsed = round(time.monotonic() - started, 6)
        return jsonify(status="ok", seconds=elapsed, **summary), 200

    @bp.get("/stats")
    def stats() -> Response:
        app = t.cast(Flask, current_app._get_current_object())  # type: ignore[attr-defined]
        return jsonify(reqconn.stats(app))

    return bp
