"""The watcher thread: a departed client's query is cancelled, a present one's is not.

Real leases of a real pool, real loopback sockets; the statement cancelled is
whatever runs on the lease's connection (nothing, here: a cancel of an idle
connection is harmless), so these tests look at the lease and the counters.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from flask_reqconn import ReleaseReason, get_conn, state_of
from flask_reqconn.lease import Lease
from flask_reqconn.names import CancelReason, Stat
from flask_reqconn.probes import SocketProbe
from flask_reqconn.probes.waitress import WaitressProbe
from flask_reqconn.watcher import WATCH_DELAY, get_watcher
from tests import pg
from tests.appfixtures import AppFactory


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    try:
        yield client, server
    finally:
        client.close()
        server.close()


@pytest.fixture
def lease(make_app: AppFactory) -> Iterator[Lease]:
    app = make_app()
    taken = state_of(app).pools["default"].checkout(method="GET", path="/w", endpoint="w")
    try:
        yield taken
    finally:
        taken.release(ReleaseReason.TEARDOWN)


def test_a_closed_client_gets_its_lease_cancelled(
    lease: Lease, pair: tuple[socket.socket, socket.socket]
) -> None:
    client, server = pair
    watch = get_watcher().watch_client(lease, SocketProbe(server), eof_means_gone=True)
    assert watch is not None and lease.watch is watch
    client.close()
    counters = lease._holder.counters
    pg.wait_until(lambda: counters[Stat.CANCELLED], timeout=20, message="the watcher saw it")
    assert lease.cancelled is CancelReason.CLIENT_GONE
    assert counters[Stat.CANCELLED] == 1
    assert lease.active  # the watcher never returns a connection: the request does


def test_a_reset_counts_even_when_eof_does_not(
    lease: Lease, pair: tuple[socket.socket, socket.socket]
) -> None:
    client, server = pair
    get_watcher().watch_client(lease, SocketProbe(server), eof_means_gone=False)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    pg.wait_until(lambda: lease.cancelled, timeout=20, message="the watcher saw the reset")


def test_a_half_close_is_not_gone_when_eof_does_not_count(
    lease: Lease, pair: tuple[socket.socket, socket.socket]
) -> None:
    client, server = pair
    get_watcher().watch_client(lease, SocketProbe(server), eof_means_gone=False)
    client.shutdown(socket.SHUT_WR)  # still reading
    time.sleep(0.3)
    assert lease.cancelled is None


def test_a_client_sending_data_is_never_taken_for_gone(
    lease: Lease, pair: tuple[socket.socket, socket.socket]
) -> None:
    client, server = pair
    get_watcher().watch_client(lease, SocketProbe(server), eof_means_gone=True)
    client.sendall(b"a pipelined request")
    client.close()  # unread data hides the close
    time.sleep(0.3)
    assert lease.cancelled is None


def test_a_polled_client_is_cancelled_when_its_check_flips(lease: Lease) -> None:
    gone = {"now": False}
    probe = WaitressProbe(lambda: gone["now"])
    assert get_watcher().watch_client(lease, probe, eof_means_gone=True) is not None
    time.sleep(0.1)
    assert lease.cancelled is None
    gone["now"] = True
    pg.wait_until(lambda: lease.cancelled, timeout=20, message="the poll saw the client go")


def test_release_drops_the_registration(
    make_app: AppFactory, pair: tuple[socket.socket, socket.socket]
) -> None:
    client, server = pair
    app = make_app()
    taken = state_of(app).pools["default"].checkout(method="GET", path="/w", endpoint="w")
    watcher = get_watcher()
    watch = watcher.watch_client(taken, SocketProbe(server), eof_means_gone=True)
    assert watch is not None and watcher._by_fd.get(server.fileno()) is watch
    taken.release(ReleaseReason.TEARDOWN)
    assert taken.watch is None and server.fileno() not in watcher._by_fd
    client.close()
    time.sleep(0.2)
    assert taken.cancelled is None


def test_a_lease_released_before_its_delay_is_never_registered(
    make_app: AppFactory, pair: tuple[socket.socket, socket.socket]
) -> None:
    client, server = pair
    app = make_app()
    taken = state_of(app).pools["default"].checkout(method="GET", path="/w", endpoint="w")
    get_watcher().watch_client_later(taken, SocketProbe(server), eof_means_gone=True)
    taken.release(ReleaseReason.TEARDOWN)
    time.sleep(WATCH_DELAY * 4)
    assert taken.watch is None
    client.close()
    time.sleep(0.2)
    assert taken.cancelled is None


def test_a_lease_still_held_after_its_delay_is_registered(
    lease: Lease, pair: tuple[socket.socket, socket.socket]
) -> None:
    client, server = pair
    get_watcher().watch_client_later(lease, SocketProbe(server), eof_means_gone=True)
    pg.wait_until(lambda: lease.watch, timeout=20, message="registered once due")
    client.close()
    pg.wait_until(lambda: lease.cancelled, timeout=20, message="the watcher saw the close")


def test_max_hold_cancels_a_runaway_request_and_the_connection_is_replaced(
    make_app: AppFactory,
) -> None:
    app: Flask = make_app(max_hold=0.3, max_size=1)

    @app.get("/runaway")
    def runaway() -> str:
        get_conn().execute("select pg_sleep(30)")
        return "never"

    started = time.monotonic()
    response = app.test_client().get("/runaway")
    assert response.status_code == 503
    assert time.monotonic() - started < 20
    s: dict[str, Any] = state_of(app).stats()
    assert s["reclaimed"] == 1 and s["discarded_connections"] == 1 and s["checked_out"] == 0
