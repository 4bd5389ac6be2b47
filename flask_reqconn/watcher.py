"""One background thread per worker process: departed clients, long holds, leaks.

The watcher starts with the first pool of the process that serves requests
(pools open there, never at import or in ``init_app``), again in a forked child,
and stops at exit.

- **Departed clients.** The client sockets of requests holding a connection
  are registered with ``epoll`` (``EPOLLRDHUP``, one-shot): when one reports a
  close or a reset, a non-blocking ``recv(1, MSG_PEEK)`` decides (EOF or reset:
  gone; data: unknown, never gone) and the running statement of that request
  is cancelled (:meth:`Lease.cancel`). Clients whose probe has no descriptor
  for ``epoll`` (waitress's ``client_disconnected``; any server under gevent's
  monkey patching or where ``epoll`` does not exist) are polled instead every
  :data:`POLL_INTERVAL` (:mod:`flask_reqconn.probes` knows which).
- **Long holds** (``REQCONN_MAX_HOLD``) and **leaks**
  (``REQCONN_LEAK_THRESHOLD``) are checked every tick.

The watcher only ever cancels statements, shuts sockets down and logs: it never
calls libpq on a request's connection, never returns or closes one; that stays
with the request's own thread. When a cancel cannot reach the server (a frozen
server accepts the cancel request's connection and never answers; a dropped path
never completes it), ``REQCONN_MAX_HOLD`` shuts the connection's socket down
(:meth:`Lease.sever`): the request thread, blocked on that socket, gets an
``OperationalError`` at once and its connection is discarded.
"""

from __future__ import annotations

import atexit
import logging
import os
import select
import threading
import time
import typing as t
import weakref

from .lease import PENDING_CLIENTS, WATCH_DELAY
from .names import CancelReason, Stat

if t.TYPE_CHECKING:
    from .lease import Lease
    from .pool import PoolHolder
    from .probes import ClientProbe

logger = logging.getLogger("flask_reqconn.watcher")

#: Seconds between polls of clients that cannot be watched with epoll.
POLL_INTERVAL = 0.05
#: The shortest sleep of the watcher thread, in seconds.
_MIN_WAIT = 0.001
#: Seconds a cancel request sent by the watcher may take before it gives up on it.
WATCHER_CANCEL_TIMEOUT = 2.0
#: Seconds past ``REQCONN_MAX_HOLD`` after which a lease whose cancel was sent
#: but whose statement did not end has its socket shut down (:meth:`Lease.sever`).
SEVER_AFTER_CANCEL = 2.0

_EPOLLRDHUP = getattr(select, "EPOLLRDHUP", 0x2000)
#: A peer's close (FIN) or reset, once; EPOLLHUP and EPOLLERR always report.
_WATCH_EVENTS = _EPOLLRDHUP | getattr(select, "EPOLLONESHOT", 1 << 30)


class ClientWatch:
    """The watcher's registration of one request's client."""

    __slots__ = ("lease", "probe", "fd", "eof_means_gone", "watcher", "since")

    def __init__(
        self, watcher: Watcher, lease: Lease, probe: ClientProbe, *, eof_means_gone: bool
    ) -> None:
        self.watcher = watcher
        self.lease = lease
        self.probe = probe
        self.fd = probe.fileno()
        self.eof_means_gone = eof_means_gone
        self.since = time.monotonic()

    def discard(self, lease: Lease) -> None:
        self.watcher.unwatch(self)

    def gone(self) -> bool:
        return self.probe.gone(self.eof_means_gone)


class Watcher:
    """The per-process watcher thread (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: weakref.WeakSet[PoolHolder] = weakref.WeakSet()
        self._by_fd: dict[int, ClientWatch] = {}
        self._polled: set[ClientWatch] = set()
        self._epoll: t.Any = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        #: the process whose thread is running (0: none); the thread clears it as it ends
        self._running_in = 0
        self._stop = threading.Event()
        self._tick = 1.0
        self._said_unwatchable = False

    @property
    def running(self) -> bool:
        # a flag, not Thread.is_alive(): this is read at every checkout
        return self._running_in == os.getpid()

    # -- registration (request threads) -----------------------------------------

    def start(self) -> None:
        """Run the thread in this process (started with each pool: a pool opens in the
        process that serves its requests, and again in a forked child)."""
        if not self.running:
            with self._lock:
                self._ensure_running()

    def watch(self, holder: PoolHolder, interval: float) -> None:
        """Run *holder*'s periodic checks at least every *interval* seconds."""
        if self.running and holder in self._pools and interval >= self._tick:
            return
        with self._lock:
            self._pools.add(holder)
            self._tick = min(self._tick, interval)
            self._ensure_running()

    def watch_client(
        self, lease: Lease, probe: ClientProbe, *, eof_means_gone: bool
    ) -> ClientWatch | None:
        """Watch the request's client; cancel *lease*'s query if it leaves.

        Only while *lease* is held and not cancelled (:meth:`Lease.watch_client`).
        """
        lease.watch_client(lambda held: self._register(held, probe, eof_means_gone))
        watch = lease.watch
        return watch if isinstance(watch, ClientWatch) else None

    def _register(
        self, lease: Lease, probe: ClientProbe, eof_means_gone: bool
    ) -> ClientWatch | None:
        if not probe.watchable:
            if not self._said_unwatchable:
                self._said_unwatchable = True
                logger.debug(
                    "the WSGI server exposes no client socket: departed clients"
                    " cannot be watched; cancellation on disconnect is off"
                )
            return None
        entry = ClientWatch(self, lease, probe, eof_means_gone=eof_means_gone)
        with self._lock:
            self._ensure_running()
            if entry.fd >= 0 and self._epoll is None and hasattr(select, "epoll"):
                self._epoll = select.epoll()
            if entry.fd >= 0 and self._epoll is not None:
                old = self._by_fd.pop(entry.fd, None)
                try:
                    if old is not None:
                        self._epoll.unregister(entry.fd)
                    self._epoll.register(entry.fd, _WATCH_EVENTS)
                except OSError:
                    return None
                self._by_fd[entry.fd] = entry
            else:
                self._polled.add(entry)
        return entry

    def _register_due(self) -> float | None:
        """Register the clients of the leases held :data:`~flask_reqconn.lease.WATCH_DELAY`
        (:class:`~flask_reqconn.lease.PendingClients`).

        :returns: when the oldest entry left is due; None when none is left.
        """
        due, next_due = PENDING_CLIENTS.take_due(time.monotonic())
        for lease, probe, eof_means_gone in due:
            self.watch_client(lease, probe, eof_means_gone=eof_means_gone)
        return next_due

    def unwatch(self, entry: ClientWatch) -> None:
        with self._lock:
            if self._by_fd.get(entry.fd) is entry:
                del self._by_fd[entry.fd]
                if self._epoll is not None and self._pid == os.getpid():
                    try:
                        self._epoll.unregister(entry.fd)
                    except (OSError, ValueError):
                        pass
            else:
                self._polled.discard(entry)

    # -- the thread ------------------------------------------------------------------

    def _ensure_running(self) -> None:
        """Start the thread in this process if needed. Caller holds ``_lock``."""
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        pid = os.getpid()
        if self._pid != pid:  # a fork: the parent's registrations mean nothing here
            self._by_fd.clear()
            self._polled.clear()
            self._epoll = None
            if self._pid:
                PENDING_CLIENTS.clear()
        self._stop = threading.Event()
        self._pid = pid
        self._thread = threading.Thread(
            target=self._run, name=f"flask-reqconn-watcher-{pid}", daemon=True
        )
        self._running_in = pid
        self._thread.start()
        logger.debug("watcher started in process %d", pid)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread of this process (idempotent)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and self._pid == os.getpid() and thread.is_alive():
            thread.join(timeout)

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            if self._thread is threading.current_thread():
                self._running_in = 0

    def _loop(self) -> None:
        stop = self._stop
        next_tick = time.monotonic() + self._tick
        next_due: float | None = None
        while not stop.is_set():
            timeout = max(0.0, min(next_tick - time.monotonic(), self._tick))
            if self._polled or self._epoll is None:
                timeout = min(timeout, POLL_INTERVAL)
            # Wake when the oldest request still held is due, not per request (a
            # wake-up per request would fight the request threads for the GIL);
            # with nothing queued, every WATCH_DELAY, to see what came meanwhile.
            if next_due is not None:
                timeout = min(timeout, max(next_due - time.monotonic(), _MIN_WAIT))
            else:
                timeout = min(timeout, WATCH_DELAY)
            try:
                self._wait(timeout)
                next_due = self._register_due()
                for entry in list(self._polled):
                    if entry.gone():
                        self._client_gone(entry)
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + self._tick
                    for holder in list(self._pools):
                        holder.periodic_checks()
            except Exception:  # never let the watcher die
                logger.exception("flask-reqconn watcher error")
                next_due = None
                stop.wait(0.1)

    def _wait(self, timeout: float) -> None:
        epoll = self._epoll
        if epoll is None:
            self._stop.wait(timeout)
            return
        for fd, _events in epoll.poll(timeout):
            entry = self._by_fd.get(fd)
            if entry is None:
                continue
            if entry.gone():
                self._client_gone(entry)
            # otherwise: data pending (unknown) or a half-close that does not
            # count: stay disarmed (one-shot) until the request ends

    def _client_gone(self, entry: ClientWatch) -> None:
        self.unwatch(entry)
        lease = entry.lease
        if lease.cancel(CancelReason.CLIENT_GONE, WATCHER_CANCEL_TIMEOUT):
            lease.count(Stat.CANCELLED)
            logger.debug(
                "client of %s %s left after %.3f s: cancelled its query",
                lease.method,
                lease.path,
                time.monotonic() - entry.since,
            )


_watcher: Watcher | None = None
_watcher_lock = threading.Lock()


def get_watcher() -> Watcher:
    """The process-wide watcher, created on first use."""
    global _watcher
    if _watcher is None:
        with _watcher_lock:
            if _watcher is None:
                _watcher = Watcher()
                atexit.register(_watcher.stop)
    return _watcher
