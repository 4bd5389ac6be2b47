"""Streamed responses keep their connection until the stream ends or is closed."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, Response, request, stream_with_context

from flask_reqconn import ReleaseReason, get_conn
from tests.appfixtures import AppFactory, reqconn_of


def stats(app: Flask) -> dict[str, Any]:
    return reqconn_of(app).stats(app)


def pid_of_request(app: Flask, path: str = "/pid") -> int:
    return int(app.test_client().get(path).data)


def streaming_app(make_app: AppFactory, **config: Any) -> tuple[Flask, list[Any]]:
    app = make_app(max_size=2, **config)
    leases: list[Any] = []

    @app.get("/pid")
    def pid() -> str:
        return str(get_conn().execute("select pg_backend_pid()").fetchone()[0])

    @app.get("/ctx-stream")
    def ctx_stream() -> Response:
        leases.append(request._flask_reqconn.leases["default"])

        @stream_with_context
        def rows() -> Iterator[str]:
            for i in range(4):
                row = get_conn().execute(
                    "select pg_backend_pid(), now()::text, %s", (i,)
                ).fetchone()
                yield f"{row[0]} {row[1].replace(' ', 'T')}\n"

        return Response(rows())

    @app.get("/plain-stream")
    def plain_stream() -> Response:
        conn = get_conn()
        leases.append(request._flask_reqconn.leases["default"])

        def rows() -> Iterator[str]:
            for _ in range(4):
                yield f"{conn.execute('select pg_backend_pid()').fetchone()[0]}\n"

        return Response(rows())

    @app.get("/failing-stream")
    def failing_stream() -> Response:
        conn = get_conn()
        leases.append(request._flask_reqconn.leases["default"])

        def rows() -> Iterator[str]:
            yield "first\n"
            conn.execute("select 1/0")
            yield "never\n"

        return Response(rows())

    return app, leases


@pytest.mark.parametrize("path", ["/ctx-stream", "/plain-stream"])
def test_stream_and_concurrent_requests_never_share_a_connection(
    make_app: AppFactory, path: str
) -> None:
    app, leases = streaming_app(make_app)
    response = app.test_client().get(path, buffered=False)
    body = iter(response.response)
    first = next(body)
    stream_pid = int(first.split()[0])
    # Flask has already run teardown once (before the body): the lease must hold.
    assert leases[0].active
    assert stats(app)["checked_out"] == 1
    others = {pid_of_request(app) for _ in range(6)}
    assert stream_pid not in others
    rest = list(body)
    assert {int(line.split()[0]) for line in rest} == {stream_pid}
    if path == "/ctx-stream":
        # every row of the stream ran in the same transaction: nobody else used it
        assert len({line.split()[1] for line in [first, *rest]}) == 1
    response.close()
    assert leases[0].released_by is ReleaseReason.CLOSE
    assert stats(app)["checked_out"] == 0


def test_stream_closed_after_first_chunk_releases_as_abort(make_app: AppFactory) -> None:
    app, leases = streaming_app(make_app)
    response = app.test_client().get("/ctx-stream", buffered=False)
    next(iter(response.response))
    response.close()
    assert leases[0].released_by is ReleaseReason.ABORT
    s = stats(app)
    assert s["checked_out"] == 0 and s["releases"]["abort"] == 1
    # the connection came back clean: the next request can use it
    assert pid_of_request(app) > 0


def test_error_inside_stream_releases_at_once(make_app: AppFactory) -> None:
    app, leases = streaming_app(make_app)
    response = app.test_client().get("/failing-stream", buffered=False)
    body = iter(response.response)
    assert next(body) == b"first\n"
    with pytest.raises(Exception, match="division by zero"):
        next(body)
    assert leases[0].released_by is ReleaseReason.EXCEPTION
    response.close()
    assert stats(app)["releases"]["exception"] == 1
    assert pid_of_request(app) > 0


def test_stream_nobody_closes_is_returned_by_the_finalizer(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app, leases = streaming_app(make_app)
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/ctx-stream",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
        "wsgi.input": None,
    }
    from werkzeug.test import EnvironBuilder

    environ = EnvironBuilder(path="/ctx-stream").get_environ()
    app_iter = app.wsgi_app(environ, lambda status, headers, exc_info=None: None)
    next(iter(app_iter))
    del app_iter, environ
    gc.collect()
    assert leases[0].active  # deferred to a safe point, not done inside gc
    with caplog.at_level("WARNING", logger="flask_reqconn"):
        s = stats(app)
    assert leases[0].released_by is ReleaseReason.FINALIZER
    assert s["checked_out"] == 0 and s["pools"]["default"]["finalized"] == 1
    assert any("never released" in r.getMessage() for r in caplog.records)
    assert pid_of_request(app) > 0


def test_error_page_is_not_treated_as_a_stream(make_app: AppFactory) -> None:
    app, _ = streaming_app(make_app)

    @app.get("/boom")
    def boom() -> str:
        get_conn()
        raise RuntimeError("x")

    # not closed on purpose: a fixed body must not keep the connection
    assert app.test_client().get("/boom").status_code == 500
    assert stats(app)["checked_out"] == 0


def test_a_lazy_stream_whose_client_left_before_its_checkout_ends_quietly(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The generator's own ``get_conn()`` sees the client gone: ClientGone ends the body.

    No connection was taken before the body: the wrapper guards such a stream all the same.
    """
    import socket

    app = make_app(checkout="lazy")

    @app.get("/lazy-stream")
    def lazy_stream() -> Response:
        @stream_with_context
        def rows() -> Iterator[str]:
            yield "first\n"
            yield str(get_conn().execute("select 1").fetchone()[0])

        return Response(rows())

    ours, peer = socket.socketpair()
    with ours, peer:
        peer.close()  # the client left
        with caplog.at_level("INFO", logger="flask_reqconn.checkout"):
            response = app.test_client().get(
                "/lazy-stream", environ_base={"werkzeug.socket": ours}
            )
            assert response.data == b"first\n"
    messages = [r.getMessage() for r in caplog.records if r.name == "flask_reqconn.checkout"]
    assert messages == [
        "client gone before its connection was used: GET /lazy-stream; answered 499"
    ]
    assert stats(app)["checkouts"] == 0 and stats(app)["client_gone"] == 1
