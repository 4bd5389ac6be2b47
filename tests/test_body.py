"""Request bodies under real gunicorn: slow, stalled, cut and malformed uploads.

A body up to ``REQCONN_BODY_BUFFER`` is read by the WSGI wrapper before the eager
checkout, so a client that trickles or stops its body holds a worker thread and never
a pool connection; a silent one is answered 408 after ``REQCONN_BODY_TIMEOUT``; a
client that leaves mid-body is a 499 and a malformed body a 400, without a traceback,
whoever reads the body (the wrapper, or a view reading a larger one).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests import fix_servers, pg, servers

pytestmark = pytest.mark.slow

APP = "tests.apps.reqconn_app:create_app()"


def start(
    spawn: Callable[..., servers.ServerProcess],
    pg_dsn: str,
    *,
    worker_class: str = "gthread",
    threads: int = 8,
    max_size: int = 2,
    env: dict[str, str] | None = None,
) -> servers.ServerProcess:
    """gunicorn with *worker_class*, or ``werkzeug`` (dev server), ``waitress``, ``uwsgi``."""
    env = {
        "RC_DSN": pg_dsn,
        "RC_APPNAME": pg.unique_name("body"),
        "RC_MAX_SIZE": str(max_size),
        "RC_TIMEOUT": "2",
        "RC_LOG": "INFO",
        **(env or {}),
    }
    if worker_class == "werkzeug":
        return spawn("werkzeug_dev", APP.replace("()", ""), env=env)  # type: ignore[no-any-return]
    if worker_class == "waitress":
        return spawn("waitress", APP.replace("()", ""), env=env)  # type: ignore[no-any-return]
    if worker_class == "uwsgi":
        return spawn(fix_servers.uwsgi, APP, threads=4, env=env)  # type: ignore[no-any-return]
    return spawn(  # type: ignore[no-any-return]
        "gunicorn",
        APP,
        worker_class=worker_class,
        workers=1,
        threads=threads if worker_class == "gthread" else 1,
        env=env,
    )


def stats(server: servers.ServerProcess) -> dict[str, Any]:
    status, _, body = servers.http_get(server.url + "/_stats")
    assert status == 200, body[:300]
    return json.loads(body)  # type: ignore[no-any-return]


def post_head(
    server: servers.ServerProcess, path: str, length: int | None, content_type: str = ""
) -> socket.socket:
    """A socket that sent the head of a POST (chunked when *length* is None)."""
    sock = servers.raw_connect(server.url, timeout=30)
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    extra = f"Content-Type: {content_type}\r\n" if content_type else ""
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{framing}\r\n{extra}\r\n".encode()
    )
    return sock


def read_status(sock: socket.socket) -> tuple[int, bytes]:
    """The status and body of the response on *sock* (closes it)."""
    data = b""
    with sock:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            None,
        )
        while length is not None and len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    assert data, "no response"
    return int(head.split()[1]), body


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def log_of(server: servers.ServerProcess) -> str:
    return server.log_path.read_text(errors="replace")


def test_slow_and_stalled_uploads_hold_no_connection(
    spawn: Callable[..., servers.ServerProcess], pg_dsn: str
) -> None:
    """Four attackers against a pool of 2: probes keep getting 200 within the timeout."""
    server = start(spawn, pg_dsn, env={"RC_BODY_TIMEOUT": "4"})
    trickled = [post_head(server, "/upload", 8) for _ in range(2)]
    silent = [post_head(server, "/upload", 1000) for _ in range(2)]
    for sock in silent:
        sock.sendall(b"x" * 10)  # then nothing

    stop = threading.Event()

    def trickle() -> None:
        for _ in range(8):
            if stop.wait(0.4):
                return
            for sock in trickled:
                sock.sendall(b"y")

    sender = threading.Thread(target=trickle)
    sender.start()
    try:
        time.sleep(0.5)  # every attacker is in, its thread reading its body
        probes = []
        for _ in range(6):
            began = time.monotonic()
            status, _, body = servers.http_get(server.url + "/", timeout=10)
            probes.append((status, round(time.monotonic() - began, 2), body[:80]))
            assert stats(server)["checked_out"] == 0
            time.sleep(0.2)
        assert [p[0] for p in probes] == [200] * 6, probes  # a pool wait would be a 503
    finally:
        sender.join()
        stop.set()
    for sock in trickled:
        status, body = read_status(sock)
        assert (status, json.loads(body)["size"]) == (200, 8)
    began = time.monotonic()
    for sock in silent:
        assert read_status(sock)[0] == 408
    assert time.monotonic() - began < 10
    s = stats(server)
    assert (s["stalled"], s["checked_out"], s["exhausted"]) == (2, 0, 0)
    log = log_of(server)
    assert log.count("the client stalled after") == 2 and log.count("answered 408") == 2
    assert "Traceback" not in log


def test_a_body_larger_than_the_buffer_is_read_by_the_view_before_its_checkout(
    spawn: Callable[..., servers.ServerProcess], pg_dsn: str
) -> None:
    server = start(spawn, pg_dsn, env={"RC_BODY_BUFFER": "1000"})
    sock = post_head(server, "/upload", 3000)
    for _ in range(5):  # the view reads it as it comes: no connection meanwhile
        sock.sendall(b"z" * 500)
        time.sleep(0.3)
        assert stats(server)["checked_out"] == 0
    sock.sendall(b"z" * 500)
    status, body = read_status(sock)
    assert (status, json.loads(body)["size"]) == (200, 3000)

    # request.stream, a chunked body over the buffer, a buffered one, multipart
    for length, chunked, path in ((5000, True, "/upload-stream"), (700, True, "/upload-stream")):
        sock = post_head(server, path, None if chunked else length)
        sock.sendall(b"".join(b"%x\r\n%s\r\n" % (100, b"c" * 100) for _ in range(length // 100)))
        sock.sendall(b"0\r\n\r\n")
        status, body = read_status(sock)
        assert (status, json.loads(body)["size"]) == (200, length)
    boundary = "BOUNDARY"
    form = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nreqconn\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n{'f' * 2500}\r\n--{boundary}--\r\n"
    ).encode()
    for buffer in ("small", "large"):
        sock = post_head(
            server if buffer == "small" else server,
            "/form",
            len(form),
            f"multipart/form-data; boundary={boundary}",
        )
        sock.sendall(form)
        status, body = read_status(sock)
        assert (status, json.loads(body)) == (200, {"name": "reqconn", "file": 2500})
    assert stats(server)["checked_out"] == 0


@pytest.mark.parametrize("worker_class", ["sync", "gthread", "gevent", "werkzeug", "uwsgi"])
def test_a_client_that_leaves_mid_body_is_a_499_and_a_malformed_body_a_400(
    spawn: Callable[..., servers.ServerProcess], pg_dsn: str, worker_class: str
) -> None:
    """Read by the wrapper (small bodies) and by the view (over REQCONN_BODY_BUFFER)."""
    server = start(spawn, pg_dsn, worker_class=worker_class, env={"RC_BODY_BUFFER": "2000"})
    for length in (1000, 5000):  # wrapper, view
        sock = post_head(server, "/upload", length)
        sock.sendall(b"x" * 10)
        time.sleep(0.2)
        reset(sock)
        sock = post_head(server, "/upload", length)
        sock.sendall(b"x" * 10)
        time.sleep(0.2)
        sock.close()  # FIN: the body ends early
    # uWSGI's --http-socket does not decode chunked request bodies (the app reads none)
    chunked = worker_class != "uwsgi"
    if chunked:
        sock = post_head(server, "/upload", None)
        sock.sendall(b"64\r\n" + b"c" * 40)  # a chunk cut off
        time.sleep(0.2)
        reset(sock)
        sock = post_head(server, "/upload", None)
        sock.sendall(b"64\r\n" + b"c" * 100 + b"\r\n")  # over the buffer, then cut:
        sock.sendall((b"64\r\n" + b"c" * 100 + b"\r\n") * 25 + b"64\r\n" + b"c" * 10)
        time.sleep(0.2)
        sock.close()
        sock = post_head(server, "/upload", None)
        sock.sendall(b"ZZ-not-a-size\r\nxx\r\n0\r\n\r\n")
        assert read_status(sock)[0] == 400
    gone = 6 if chunked else 4
    pg.wait_until(lambda: stats(server)["client_gone"] == gone, timeout=20, message="499s")
    s = stats(server)
    assert (s["checked_out"], s["releases"]["teardown"]) == (0, 0)  # none ever checked out
    log = log_of(server)
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    assert log.count("answered 499") == gone
    assert ("malformed body" in log) is chunked
    status, _, _ = servers.http_get(server.url + "/")
    assert status == 200


def test_waitress_reads_bodies_itself_before_the_app(
    spawn: Callable[..., servers.ServerProcess], pg_dsn: str
) -> None:
    """waitress buffers a body before it calls the app: cut bodies never reach it."""
    server = start(spawn, pg_dsn, worker_class="waitress")
    for _ in range(3):
        sock = post_head(server, "/upload", 1000)
        sock.sendall(b"x" * 10)
        time.sleep(0.2)
        reset(sock)
    sock = post_head(server, "/upload", 5)
    sock.sendall(b"12345")
    status, body = read_status(sock)
    assert (status, json.loads(body)["size"]) == (200, 5)
    s = stats(server)
    assert (s["checkouts"], s["client_gone"], s["checked_out"]) == (1, 0, 0)
    assert "Traceback" not in log_of(server)
