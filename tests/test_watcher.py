"""The watcher thread: a departed client's query is cancelled, a present one's is not.

Real leases of a real pool, real loopback sockets; the statement cancelled is
whatever runs on the lease's connection (nothing, here: a cancel of an idle
connection is harmless), so these tests look at the lease and the counters.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from flask_reqconn import ReleaseReason, get_conn, state_of
from flask_reqconn.lease import PENDING_CLIENTS, WATCH_DELAY, Lease
from flask_reqconn.names import CancelReason, Stat
from flask_reqconn.probes import SocketProbe
from flask_reqconn.probes.waitress import WaitressProbe
from flask_reqconn.watcher import ClientWatch, get_watcher
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
    taken = state_of(app).pools["default"].checkout()
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
    taken = state_of(app).pools["default"].checkout()
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
    taken = state_of(app).pools["default"].checkout()
    taken.watch_client_later(SocketProbe(server), True)
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
    lease.watch_client_later(SocketProbe(server), True)
    pg.wait_until(lambda: lease.watch, timeout=20, message="registered once due")
    client.close()
    pg.wait_until(lambda: lease.cancelled, timeout=20, message="the watcher saw the close")


def test_a_request_released_in_time_takes_its_entry_off_the_queue_itself(
    make_app: AppFactory, pair: tuple[socket.socket, socket.socket]
) -> None:
    """One request at a time (gunicorn sync): nothing is left for the watcher to drop."""
    _client, server = pair
    app = make_app()
    holder = state_of(app).pools["default"]
    for _ in range(20):
        taken = holder.checkout()
        taken.watch_client_later(SocketProbe(server), True)
        assert taken.watch is PENDING_CLIENTS
        queued = [queued for queued in PENDING_CLIENTS if queued is taken]
        assert len(queued) == 1
        taken.release(ReleaseReason.TEARDOWN)
        assert taken.watch is None
        assert taken not in list(PENDING_CLIENTS)


def test_a_release_never_takes_another_requests_entry_off_the_queue(
    make_app: AppFactory, pair: tuple[socket.socket, socket.socket]
) -> None:
    """Requests interleaved (gthread): a long request queued before and among short ones
    that end first is still registered once due, and cancelled when its client goes."""
    client, server = pair
    app = make_app(max_size=3)
    holder = state_of(app).pools["default"]
    short_client, short_server = socket.socketpair()
    try:
        early = holder.checkout()
        early.watch_client_later(SocketProbe(short_server), True)
        long = holder.checkout()
        long.watch_client_later(SocketProbe(server), True)
        early.release(ReleaseReason.TEARDOWN)  # older than the long one: not the newest
        for _ in range(30):
            short = holder.checkout()
            short.watch_client_later(SocketProbe(short_server), True)
            short.release(ReleaseReason.TEARDOWN)
        assert long in list(PENDING_CLIENTS)
        pg.wait_until(
            lambda: isinstance(long.watch, ClientWatch), timeout=20, message="registered once due"
        )
        client.close()
        pg.wait_until(lambda: long.cancelled, timeout=20, message="the watcher saw the close")
        long.release(ReleaseReason.TEARDOWN)
        pg.wait_until(
            lambda: early not in list(PENDING_CLIENTS),
            timeout=20,
            message="the watcher dropped the released request's entry",
        )
    finally:
        short_client.close()
        short_server.close()


def test_the_watcher_does_not_wake_per_request(
    make_app: AppFactory, pair: tuple[socket.socket, socket.socket], monkeypatch: Any
) -> None:
    """Short requests queue and unqueue without waking the watcher thread each time."""
    _client, server = pair
    app = make_app()
    holder = state_of(app).pools["default"]
    watcher = get_watcher()
    taken = holder.checkout()
    taken.watch_client_later(SocketProbe(server), True)
    taken.release(ReleaseReason.TEARDOWN)  # the thread is running
    wakes = [0]
    register_due = watcher._register_due

    def counting() -> float | None:
        wakes[0] += 1
        return register_due()

    monkeypatch.setattr(watcher, "_register_due", counting)
    time.sleep(WATCH_DELAY * 2)  # the next wake-up uses the patched method
    wakes[0] = 0
    started = time.monotonic()
    requests = 0
    while time.monotonic() - started < 0.5 or requests < 100:
        taken = holder.checkout()
        taken.watch_client_later(SocketProbe(server), True)
        taken.release(ReleaseReason.TEARDOWN)
        requests += 1
    elapsed = time.monotonic() - started
    # at most one wake-up per WATCH_DELAY / 2 (the old bound), with room for a late start
    assert wakes[0] <= elapsed / (WATCH_DELAY / 2) + 3, (wakes[0], requests, elapsed)
    assert requests > 5 * wakes[0]


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


def one_watched_request(holder: Any, server: socket.socket) -> None:
    """A request whose client is queued for the watcher (started by the pool's opening)."""
    taken = holder.checkout()
    taken.watch_client_later(SocketProbe(server), True)
    taken.release(ReleaseReason.TEARDOWN)


def test_the_watcher_is_restarted_after_it_stopped(
    make_app: AppFactory, pair: tuple[socket.socket, socket.socket]
) -> None:
    """``running`` is a flag the thread clears as it ends: a stopped watcher is started
    again with the next pool that opens."""
    _client, server = pair
    holder = state_of(make_app()).pools["default"]
    watcher = get_watcher()
    one_watched_request(holder, server)
    first = watcher._thread
    assert watcher.running and first is not None and first.is_alive()
    watcher.stop()
    assert not first.is_alive()
    assert not watcher.running
    holder.close()
    one_watched_request(holder, server)
    second = watcher._thread
    assert second is not None and second is not first and second.is_alive()
    assert watcher.running


def test_a_forked_child_does_not_take_its_parents_watcher_for_running(
    make_app: AppFactory, pair: tuple[socket.socket, socket.socket]
) -> None:
    _client, server = pair
    holder = state_of(make_app()).pools["default"]
    watcher = get_watcher()
    one_watched_request(holder, server)
    assert watcher.running
    pid = os.fork()
    if pid == 0:  # the child: only read the flag (no lock, no libpq)
        os._exit(0 if not get_watcher().running else 3)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:  # pragma: no cover - a stuck child
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child did not exit")
    assert os.waitstatus_to_exitcode(status) == 0
    assert watcher.running  # the parent's is untouched
