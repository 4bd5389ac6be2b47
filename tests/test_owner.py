"""Only its own live request ever uses a connection (flask_reqconn.connection).

A connection kept past its request (a global, a thread the view started, a block that
ended) refuses to run statements, commit or roll back anywhere else, so a later request
never commits another's writes, with the defaults (no strict mode).
"""

from __future__ import annotations

import contextvars
import json
import threading
import time
from typing import Any

import psycopg
import pytest
from flask import Flask, Response

from flask_reqconn import ConnectionReleased, get_conn, state_of
from tests import pg
from tests.appfixtures import AppFactory, what_rows


def stray_app(make_app: AppFactory, what_table: str) -> tuple[Flask, dict[str, Any]]:
    app = make_app(checkout="lazy", max_size=1)
    app.testing = False  # a stray use is the app's bug: a 500, as users see it
    seen: dict[str, Any] = {}

    @app.get("/keep")
    def keep() -> str:
        seen["kept"] = get_conn()
        return "kept"

    @app.get("/use-kept")
    def use_kept() -> str:
        seen["kept"].execute(f"insert into {what_table} values ('stray')")
        return "wrote"

    @app.get("/commit")
    def commit() -> str:
        conn = get_conn()
        conn.execute(f"insert into {what_table} values ('own')")
        conn.commit()
        return "committed"

    @app.get("/spawn")
    def spawn() -> str:
        conn = get_conn()

        def later() -> None:
            time.sleep(0.3)  # after the response
            try:
                conn.execute(f"insert into {what_table} values ('thread')")
                conn.commit()
            except Exception as exc:
                seen["thread"] = exc

        seen["runner"] = threading.Thread(target=later)
        seen["runner"].start()
        return "spawned"

    @app.get("/helper")
    def helper() -> str:
        conn = get_conn()
        found: list[Any] = []
        plain = threading.Thread(target=lambda: found.append(_try(conn)))
        plain.start()
        plain.join()
        ctx = contextvars.copy_context()  # the request's context: its own helper
        runner = threading.Thread(target=ctx.run, args=(lambda: found.append(_try(conn)),))
        runner.start()
        runner.join()
        seen["helper"] = found
        return "ok"

    return app, seen


def _try(conn: psycopg.Connection[Any]) -> Any:
    try:
        return conn.execute("select 1").fetchone()[0]  # type: ignore[index]
    except ConnectionReleased as exc:
        return exc


def test_a_kept_connection_refuses_to_act_in_a_later_request(
    make_app: AppFactory, what_table: str, pg_admin: Any
) -> None:
    app, seen = stray_app(make_app, what_table)
    client = app.test_client()
    assert client.get("/keep").text == "kept"
    assert client.get("/use-kept").status_code == 500  # no get_conn(): the pool's connection
    with app.test_request_context("/holder"):
        # another request holds that very connection: code of any other context is refused
        # (the holder itself may use it: the object is its own connection now)
        assert get_conn() is seen["kept"]
        stray = contextvars.Context().run(_try, seen["kept"])
        assert isinstance(stray, ConnectionReleased)
        assert "belongs to another request (GET /holder" in str(stray)
    assert client.get("/commit").text == "committed"
    assert what_rows(pg_admin, what_table) == ["own"]  # the stray write never ran
    with pytest.raises(ConnectionReleased):
        seen["kept"].commit()
    with pytest.raises(ConnectionReleased):
        seen["kept"].rollback()
    with pytest.raises(ConnectionReleased):
        seen["kept"].cursor()


def test_a_thread_of_the_view_cannot_use_the_connection_after_the_response(
    make_app: AppFactory, what_table: str, pg_admin: Any
) -> None:
    app, seen = stray_app(make_app, what_table)
    assert app.test_client().get("/spawn").text == "spawned"
    seen["runner"].join(10)
    assert isinstance(seen["thread"], ConnectionReleased)
    assert "handed back by GET /spawn" in str(seen["thread"])
    assert "reqconn.connection()" in str(seen["thread"])
    assert what_rows(pg_admin, what_table) == []
    assert app.test_client().get("/commit").text == "committed"
    assert what_rows(pg_admin, what_table) == ["own"]


def test_a_thread_that_outlives_its_request_cannot_check_out(make_app: AppFactory) -> None:
    """A thread with a copy of the request's context (``copy_current_request_context``)
    that calls ``get_conn()`` after the response is refused: the request has ended, and a
    connection taken then would be nobody's to give back."""
    from flask import copy_current_request_context

    app = make_app(checkout="lazy", max_size=1)
    seen: dict[str, Any] = {}

    @app.get("/later")
    def later() -> str:
        @copy_current_request_context
        def work() -> None:
            time.sleep(0.3)  # after the response
            try:
                seen["got"] = get_conn()
            except Exception as exc:
                seen["error"] = exc

        seen["runner"] = threading.Thread(target=work)
        seen["runner"].start()
        return "started"

    assert app.test_client().get("/later").text == "started"
    seen["runner"].join(10)
    assert "got" not in seen, "a connection was checked out after the request ended"
    assert isinstance(seen["error"], ConnectionReleased)
    assert "GET /later has ended" in str(seen["error"])
    assert state_of(app).stats()["checked_out"] == 0


def test_during_the_request_only_its_own_context_uses_the_connection(
    make_app: AppFactory, what_table: str
) -> None:
    app, seen = stray_app(make_app, what_table)
    assert app.test_client().get("/helper").text == "ok"
    plain, in_context = seen["helper"]
    assert isinstance(plain, ConnectionReleased)
    assert "belongs to another request (GET /helper" in str(plain)
    assert "copy_context" in str(plain)
    assert in_context == 1


def test_a_connection_block_refuses_use_after_it_ended(make_app: AppFactory) -> None:
    app = make_app()
    ext = state_of(app).ext
    with ext.connection(app=app) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(ConnectionReleased, match="block ended"):
        conn.execute("select 1")


def test_a_stream_uses_its_connection_whatever_ran_in_between(make_app: AppFactory) -> None:
    app = make_app(checkout="lazy")

    @app.get("/stream")
    def stream() -> Response:
        conn = get_conn()

        def rows() -> Any:  # a plain generator: runs after the request's context is gone
            for i in range(3):
                yield f"{conn.execute('select %s::int', (i,)).fetchone()[0]}\n"

        return Response(rows())

    @app.get("/other")
    def other() -> str:
        return str(get_conn().execute("select 7").fetchone()[0])  # type: ignore[index]

    client = app.test_client()
    response = client.get("/stream", buffered=False)
    body = iter(response.response)
    assert next(body) == b"0\n"
    assert client.get("/other").text == "7"  # another request on the same thread
    assert list(body) == [b"1\n", b"2\n"]
    response.close()


@pytest.mark.slow
def test_under_gunicorn_a_kept_connection_never_writes_into_another_request(
    spawn: Any, pg_dsn: str, pg_admin: Any, what_table: str
) -> None:
    """Lazy checkout, a pool of 1: a global and a thread keep the request's connection."""
    from tests import servers

    server = spawn(
        "gunicorn", "tests.apps.reqconn_app:create_app()", worker_class="gthread", threads=4,
        env={"RC_DSN": pg_dsn, "RC_APPNAME": pg.unique_name("stray"), "RC_MAX_SIZE": "1",
             "RC_CHECKOUT": "lazy", "RC_TABLE": what_table},
    )  # fmt: skip
    assert servers.http_get(server.url + "/keep")[0] == 200
    assert servers.http_get(server.url + "/use-kept")[0] == 500
    assert "ConnectionReleased: this connection was handed back by GET /keep" in (
        server.log_text()
    )
    assert servers.http_get(server.url + "/spawn")[0] == 200
    def thread_outcome() -> str | None:
        last: str = json.loads(servers.http_get(server.url + "/kept")[2])["last"]
        return last if last.startswith(("ConnectionReleased", "committed")) else None

    last = pg.wait_until(thread_outcome, timeout=20, message="the thread ran")
    assert last.startswith("ConnectionReleased: this connection was handed back by GET /spawn")
    sock = servers.raw_connect(server.url)
    sock.sendall(b"POST /commit HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                 b"Connection: close\r\n\r\n")  # fmt: skip
    assert sock.recv(100).startswith(b"HTTP/1.1 200")
    sock.close()
    assert what_rows(pg_admin, what_table) == ["own"]  # neither stray write ran
