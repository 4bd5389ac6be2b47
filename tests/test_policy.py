"""Per-view decisions: exempt, read_only and cancel_on_disconnect, on views and blueprints."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Blueprint, Flask
from werkzeug.serving import make_server

from flask_reqconn import ReqConn, get_conn, state_of
from flask_reqconn.policy import Mark, Marks
from tests import pg
from tests.appfixtures import AppFactory, reqconn_of


def stats(app: Flask) -> dict[str, Any]:
    return reqconn_of(app).stats(app)


# -- exempt ----------------------------------------------------------------------------


def test_exempt_endpoints_by_config_decorator_and_blueprint(make_app: AppFactory) -> None:
    reqconn = ReqConn()
    bp = Blueprint("ops", __name__)

    @bp.get("/ops/ping")
    def ping() -> str:
        return "pong"

    reqconn.exempt(bp)
    app = make_app(ext=reqconn, exempt_endpoints=["health"])

    @app.get("/health")
    def health() -> str:
        return "ok"

    @app.get("/metrics")
    @reqconn.exempt
    def metrics() -> str:
        return "m"

    @app.get("/exempt-but-uses-db")
    @reqconn.exempt
    def uses_db() -> str:
        return str(get_conn().execute("select 3").fetchone()[0])

    app.register_blueprint(bp)
    client = app.test_client()
    for path in ("/health", "/metrics", "/ops/ping", "/static/nothing.css"):
        client.get(path)
    assert stats(app)["checkouts"] == 0
    assert client.get("/exempt-but-uses-db").data == b"3"
    assert stats(app)["checkouts"] == 1


def test_exempt_nested_blueprint(make_app: AppFactory) -> None:
    reqconn = ReqConn()
    parent = Blueprint("api", __name__)
    child = Blueprint("internal", __name__)

    @child.get("/ping")
    def ping() -> str:
        return "pong"

    parent.register_blueprint(child, url_prefix="/internal")
    reqconn.exempt(child)
    app = make_app(ext=reqconn)
    app.register_blueprint(parent, url_prefix="/api")
    assert app.test_client().get("/api/internal/ping").data == b"pong"
    assert stats(app)["checkouts"] == 0


def test_blueprint_registered_under_another_name_is_still_exempt(make_app: AppFactory) -> None:
    reqconn = ReqConn()
    bp = Blueprint("ops", __name__)

    @bp.get("/ping")
    def ping() -> str:
        return "pong"

    reqconn.exempt(bp)
    app = make_app(ext=reqconn)
    app.register_blueprint(bp, name="ops_v2", url_prefix="/v2")
    assert app.test_client().get("/v2/ping").data == b"pong"
    assert stats(app)["checkouts"] == 0


def test_exempting_one_blueprint_leaves_a_namesake_in_another_parent_alone(
    make_app: AppFactory,
) -> None:
    reqconn = ReqConn()
    admin, api = Blueprint("admin", __name__), Blueprint("api", __name__)
    admin_internal, api_internal = Blueprint("internal", __name__), Blueprint("internal", __name__)

    @admin_internal.get("/ping")
    def admin_ping() -> str:
        return "admin"

    @api_internal.get("/ping")
    def api_ping() -> str:
        return "api"

    admin.register_blueprint(admin_internal, url_prefix="/internal")
    api.register_blueprint(api_internal, url_prefix="/internal")
    reqconn.exempt(admin_internal)
    app = make_app(ext=reqconn)
    app.register_blueprint(admin, url_prefix="/admin")
    app.register_blueprint(api, url_prefix="/api")
    client = app.test_client()
    assert client.get("/admin/internal/ping").data == b"admin"
    assert stats(app)["checkouts"] == 0
    assert client.get("/api/internal/ping").data == b"api"
    assert stats(app)["checkouts"] == 1  # the api's "internal" is not exempt


def test_a_view_that_takes_no_attributes_can_still_be_exempted(make_app: AppFactory) -> None:
    class Views:
        def ping(self) -> str:
            return "pong"

    reqconn = ReqConn()
    view = Views().ping  # a bound method: setattr fails
    reqconn.exempt(view)
    app = make_app(ext=reqconn)
    app.add_url_rule("/ping", "ping", view)
    assert app.test_client().get("/ping").data == b"pong"
    assert stats(app)["checkouts"] == 0


# -- decisions -------------------------------------------------------------------------


def test_a_views_own_mark_wins_over_its_blueprints_and_the_innermost_blueprint_wins() -> None:
    marks = Marks()
    app = Flask("marks")
    outer, inner = Blueprint("outer", __name__), Blueprint("inner", __name__)

    @inner.get("/plain")
    def plain() -> str:
        return ""

    @inner.get("/own")
    def own() -> str:
        return ""

    outer.register_blueprint(inner, url_prefix="/inner")
    app.register_blueprint(outer, url_prefix="/outer")
    marks.set(outer, Mark.CANCEL_ON_DISCONNECT, False)
    marks.set(inner, Mark.CANCEL_ON_DISCONNECT, True)
    marks.set(own, Mark.CANCEL_ON_DISCONNECT, False)
    with app.test_request_context("/outer/inner/plain"):
        assert marks.of_endpoint("outer.inner.plain", Mark.CANCEL_ON_DISCONNECT) is True
    with app.test_request_context("/outer/inner/own"):
        assert marks.of_endpoint("outer.inner.own", Mark.CANCEL_ON_DISCONNECT) is False
    with app.test_request_context("/outer/inner/plain"):
        assert marks.of_endpoint("outer.inner.plain", Mark.EXEMPT) is None


@pytest.mark.parametrize(
    ("policy", "method", "view_mark", "blueprint_mark", "armed"),
    [
        ("safe", "GET", None, None, True),
        ("safe", "POST", None, None, False),
        ("safe", "POST", None, True, True),
        ("safe", "GET", None, False, False),
        ("safe", "POST", False, True, False),
        ("all", "POST", None, None, True),
        ("off", "GET", True, True, False),
    ],
)  # fmt: skip
def test_cancel_policy_by_method_view_and_blueprint(
    make_app: AppFactory,
    policy: str,
    method: str,
    view_mark: bool | None,
    blueprint_mark: bool | None,
    armed: bool,
) -> None:
    reqconn = ReqConn()
    bp = Blueprint("api", __name__)

    @bp.route("/work", methods=["GET", "POST"])
    def work() -> str:
        return ""

    if view_mark is not None:
        reqconn.cancel_on_disconnect(view_mark)(work)
    if blueprint_mark is not None:
        reqconn.cancel_on_disconnect(blueprint_mark)(bp)
    app = make_app(ext=reqconn, cancel_on_disconnect=policy)
    app.register_blueprint(bp, url_prefix="/api")
    with app.test_request_context("/api/work", method=method):
        assert state_of(app).policy.cancel_armed["api.work", method] is armed


# -- cancel_on_disconnect on a blueprint, end to end -----------------------------------


@pytest.fixture
def serve() -> Iterator[Any]:
    """``serve(app)`` -> the URL of a threaded werkzeug server (real sockets) for *app*."""
    running: list[tuple[Any, threading.Thread]] = []

    def start(app: Flask) -> tuple[str, int]:
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        running.append((server, thread))
        return "127.0.0.1", server.server_port

    yield start
    for server, thread in running:
        server.shutdown()
        server.server_close()
        thread.join(30)


def post_and_leave(address: tuple[str, int], path: str, after: float) -> None:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        time.sleep(after)


def test_cancel_on_disconnect_on_a_blueprint_cancels_its_post_queries(
    make_app: AppFactory, serve: Any
) -> None:
    reqconn = ReqConn()
    api, other = Blueprint("api", __name__), Blueprint("other", __name__)
    finished: list[str] = []

    @api.post("/work")
    def work() -> str:
        get_conn().execute("select pg_sleep(30)")
        finished.append("api")
        return "done"

    @other.post("/work")
    def other_work() -> str:
        get_conn().execute("select pg_sleep(1)")
        finished.append("other")
        return "done"

    reqconn.cancel_on_disconnect()(api)  # POST is not cancelled by the "safe" policy
    app = make_app(ext=reqconn, cancel_on_disconnect="safe")
    app.register_blueprint(api, url_prefix="/api")
    app.register_blueprint(other, url_prefix="/other")
    address = serve(app)

    started = time.monotonic()
    post_and_leave(address, "/api/work", 0.3)
    pg.wait_until(lambda: stats(app)["cancelled"] == 1 and stats(app)["checked_out"] == 0,
                  timeout=20, message="the blueprint's pg_sleep(30) was cancelled")  # fmt: skip
    assert time.monotonic() - started < 20
    assert stats(app)["client_gone"] == 1 and finished == []

    post_and_leave(address, "/other/work", 0.3)  # not marked: runs to its end
    pg.wait_until(lambda: finished == ["other"] and stats(app)["checked_out"] == 0,
                  timeout=20, message="the unmarked POST ran to its end")  # fmt: skip
    assert stats(app)["cancelled"] == 1
