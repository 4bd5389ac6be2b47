"""The library's 503s keep ``Retry-After`` whatever handler answers them.

Apps often answer every ``HTTPException`` (or the library's exceptions, or ``503``) with
JSON of their own, which drops the exception's headers. flask-reqconn adds
``REQCONN_RETRY_AFTER`` back on a 503 answering ``PoolExhausted``, ``DatabaseUnavailable``
(in a view or before a streamed body's first chunk) or ``REQCONN_MAX_HOLD``, and leaves
other responses alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Blueprint, Flask, Response, stream_with_context
from werkzeug.exceptions import HTTPException

from flask_reqconn import DatabaseUnavailable, PoolExhausted, get_conn
from tests.appfixtures import AppFactory, reqconn_of

RETRY_AFTER = 7
KILL_MYSELF = "select pg_terminate_backend(pg_backend_pid())"


def json_answer(exc: HTTPException) -> tuple[dict[str, Any], int]:
    """The common API handler: JSON, the exception's status, none of its headers."""
    return {"error": exc.name, "handled": True}, exc.code or 500


def on_app_http_exception(app: Flask, bp: Blueprint) -> None:
    app.register_error_handler(HTTPException, json_answer)


def on_app_library_exceptions(app: Flask, bp: Blueprint) -> None:
    app.register_error_handler(PoolExhausted, json_answer)
    app.register_error_handler(DatabaseUnavailable, json_answer)


def on_app_503(app: Flask, bp: Blueprint) -> None:
    app.register_error_handler(503, json_answer)


def on_blueprint_http_exception(app: Flask, bp: Blueprint) -> None:
    bp.register_error_handler(HTTPException, json_answer)


HANDLERS: dict[str, Callable[[Flask, Blueprint], None]] = {
    "app-HTTPException": on_app_http_exception,
    "app-library-exceptions": on_app_library_exceptions,
    "app-503": on_app_503,
    "blueprint-HTTPException": on_blueprint_http_exception,
}


def api_app(make_app: AppFactory, handlers: str, **config: Any) -> Flask:
    """An app whose views are in a blueprint, with the error handlers *handlers* names."""
    app = make_app(retry_after=RETRY_AFTER, **config)
    bp = Blueprint("api", __name__)

    @bp.get("/query")
    def query() -> str:
        return str(get_conn().execute("select 1").fetchone()[0])  # type: ignore[index]

    @bp.get("/lost")
    def lost() -> str:
        get_conn().execute(KILL_MYSELF)
        return "never"

    @bp.get("/lost-stream")
    def lost_stream() -> Response:
        def body() -> Iterator[str]:
            get_conn().execute(KILL_MYSELF)
            yield "never"

        return Response(stream_with_context(body()))

    @bp.get("/runaway")
    def runaway() -> str:
        get_conn().execute("select pg_sleep(30)")
        return "never"

    @bp.get("/own-503")
    def own_503() -> tuple[str, int]:
        return "maintenance", 503

    HANDLERS[handlers](app, bp)
    app.register_blueprint(bp)
    return app


def assert_handled_503(response: Any) -> None:
    assert response.status_code == 503
    assert response.get_json()["handled"] is True  # the app's handler answered
    assert response.headers.get("Retry-After") == str(RETRY_AFTER)


@pytest.mark.parametrize("handlers", HANDLERS)
def test_pool_exhausted_keeps_retry_after(make_app: AppFactory, handlers: str) -> None:
    app = api_app(make_app, handlers, max_size=1, timeout=0.2)
    with reqconn_of(app).connection(app=app):  # the only connection
        response = app.test_client().get("/query")
    assert_handled_503(response)
    assert app.test_client().get("/query").headers.get("Retry-After") is None


@pytest.mark.parametrize("handlers", HANDLERS)
def test_database_unavailable_keeps_retry_after(make_app: AppFactory, handlers: str) -> None:
    app = api_app(make_app, handlers)
    assert_handled_503(app.test_client().get("/lost"))


@pytest.mark.parametrize("handlers", HANDLERS)
def test_a_stream_lost_before_its_first_chunk_keeps_retry_after(
    make_app: AppFactory, handlers: str
) -> None:
    app = api_app(make_app, handlers)
    with app.test_client().get("/lost-stream") as response:
        assert_handled_503(response)


@pytest.mark.parametrize("handlers", ["app-HTTPException", "app-503"])
def test_the_max_hold_503_keeps_retry_after(make_app: AppFactory, handlers: str) -> None:
    app = api_app(make_app, handlers, max_hold=0.3, max_size=1)
    response = app.test_client().get("/runaway")
    assert response.status_code == 503
    assert response.headers.get("Retry-After") == str(RETRY_AFTER)


def test_a_retry_after_of_the_handlers_own_is_kept(make_app: AppFactory) -> None:
    app = api_app(make_app, "app-HTTPException")

    @app.errorhandler(DatabaseUnavailable)
    def later(exc: DatabaseUnavailable) -> tuple[str, int, dict[str, str]]:
        return "later", 503, {"Retry-After": "30"}

    assert app.test_client().get("/lost").headers.get("Retry-After") == "30"


def test_a_handler_that_answers_another_status_gets_no_retry_after(
    make_app: AppFactory,
) -> None:
    app = api_app(make_app, "app-HTTPException")

    @app.errorhandler(DatabaseUnavailable)
    def failed(exc: DatabaseUnavailable) -> tuple[str, int]:
        return "failed", 500

    response = app.test_client().get("/lost")
    assert response.status_code == 500
    assert response.headers.get("Retry-After") is None


def test_a_503_of_the_apps_own_gets_no_retry_after(make_app: AppFactory) -> None:
    app = api_app(make_app, "app-HTTPException")
    response = app.test_client().get("/own-503")
    assert response.status_code == 503
    assert response.headers.get("Retry-After") is None

