"""Seeing a departed client without consuming anything: real sockets, one probe per server."""

from __future__ import annotations

import errno
import socket
import ssl
import struct
import sys
import types
from collections.abc import Iterator

import pytest
from werkzeug.exceptions import ClientDisconnected

from flask_reqconn.probes import (
    NO_PROBE,
    SOCKET_KEYS,
    SocketProbe,
    is_client_abort,
    is_file_wrapper,
    probe_for,
    socket_gone,
)
from flask_reqconn.probes.uwsgi import BorrowedSocket
from flask_reqconn.probes.waitress import WaitressProbe


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client, server-side) ends of a real loopback TCP connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    try:
        yield client, server
    finally:
        client.close()
        server.close()


def wait_readable(sock: socket.socket) -> None:
    import select

    readable, _, _ = select.select([sock], [], [], 10)
    assert readable, "socket never became readable"


def test_connected_idle_client_is_present(pair: tuple[socket.socket, socket.socket]) -> None:
    _, server = pair
    assert socket_gone(server) is False


def test_closed_client_is_gone(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    client.close()
    wait_readable(server)
    assert socket_gone(server) is True


def test_reset_client_is_gone(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    wait_readable(server)
    # a reset counts even when EOF does not (the kernel reports it only once)
    assert socket_gone(server, eof_means_gone=False) is True


def test_pending_data_means_unknown_and_is_not_consumed(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = pair
    client.sendall(b"body bytes")
    client.close()
    wait_readable(server)
    assert socket_gone(server) is False  # unread data hides the close
    assert server.recv(100) == b"body bytes"
    assert socket_gone(server) is True  # once read, the close shows


def test_half_close_follows_the_eof_setting(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    client.shutdown(socket.SHUT_WR)  # still reading
    wait_readable(server)
    assert socket_gone(server, eof_means_gone=True) is True
    assert socket_gone(server, eof_means_gone=False) is False


def client_socket(environ: dict[str, object]) -> object:
    probe = probe_for(environ)
    return probe.sock if isinstance(probe, SocketProbe) else None


def client_gone(environ: dict[str, object]) -> bool:
    return probe_for(environ).gone()


def test_environ_keys_of_each_server(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    for key in ("gunicorn.socket", "werkzeug.socket", "gunicorn.sock"):
        assert client_socket({key: server}) is server
    client.close()
    wait_readable(server)
    assert client_gone({"gunicorn.socket": server}) is True
    assert client_gone({"waitress.client_disconnected": lambda: True}) is True
    assert client_gone({"waitress.client_disconnected": lambda: False}) is False
    assert client_gone({}) is False


def test_each_server_gets_its_probe(pair: tuple[socket.socket, socket.socket]) -> None:
    _, server = pair
    probe = probe_for({"gunicorn.socket": server})
    assert isinstance(probe, SocketProbe) and probe.watchable
    assert probe.fileno() == server.fileno()  # epoll-watchable (no gevent here)
    waitress = probe_for({"waitress.client_disconnected": lambda: False})
    assert isinstance(waitress, WaitressProbe) and waitress.watchable
    assert waitress.fileno() == -1  # polled by the watcher
    assert probe_for({}) is NO_PROBE and not NO_PROBE.watchable and NO_PROBE.fileno() == -1


def test_uwsgi_s_borrowed_descriptor_is_peeked(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, server = pair
    fake = types.ModuleType("uwsgi")
    fake.connection_fd = server.fileno  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "uwsgi", fake)
    probe = probe_for({"uwsgi.version": b"2.0"})
    assert isinstance(probe, SocketProbe) and isinstance(probe.sock, BorrowedSocket)
    assert probe.fileno() == server.fileno() and not probe.gone()
    client.close()
    wait_readable(server)
    assert probe.gone() is True


def test_the_socket_keys_are_each_server_s_in_order() -> None:
    assert SOCKET_KEYS == ("gunicorn.socket", "gunicorn.sock", "werkzeug.socket")


def test_a_failing_waitress_check_means_present() -> None:
    def broken() -> bool:
        raise RuntimeError("channel gone")

    assert client_gone({"waitress.client_disconnected": broken}) is False


def test_file_wrappers_of_each_server_are_known() -> None:
    import io

    from gunicorn.http.wsgi import FileWrapper as GunicornFileWrapper
    from waitress.buffers import ReadOnlyFileBasedBuffer
    from werkzeug.wsgi import FileWrapper

    for body in (
        GunicornFileWrapper(io.BytesIO(b"x")),
        ReadOnlyFileBasedBuffer(io.BytesIO(b"x")),
        FileWrapper(io.BytesIO(b"x")),
    ):
        assert is_file_wrapper(body), body
    assert not is_file_wrapper(iter([b"x"]))



def test_tls_sockets_are_skipped(pair: tuple[socket.socket, socket.socket]) -> None:
    _, server = pair
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls = context.wrap_socket(server, server_side=True, do_handshake_on_connect=False)
    try:
        assert client_socket({"gunicorn.socket": tls}) is None
        assert probe_for({"gunicorn.socket": tls}) is NO_PROBE
        assert client_gone({"gunicorn.socket": tls}) is False
    finally:
        tls.detach()


def test_closed_server_socket_counts_as_gone() -> None:
    sock = socket.socket()
    sock.close()
    assert socket_gone(sock) is True


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (BrokenPipeError(), True),
        (ConnectionResetError(), True),
        (ConnectionAbortedError(), True),
        (OSError(errno.EPIPE, "Broken pipe"), True),
        (OSError(errno.ECONNRESET, "reset"), True),
        (ClientDisconnected(), True),
        (OSError(errno.ENOENT, "no such file"), False),
        (SystemExit(), False),
        (ValueError(), False),
    ],
)
def test_client_abort_classification(exc: BaseException, expected: bool) -> None:
    assert is_client_abort(exc) is expected
