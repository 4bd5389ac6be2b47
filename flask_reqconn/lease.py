"""One checkout of one connection, and the set of checkouts of one request.

A :class:`Lease` is released exactly once, by whoever gets there first: the
``teardown_request`` hook, the response iterable's ``close()``, an error that
leaves the app, or the finalizer of a response iterable nobody closed. Later
calls are no-ops, so callers never need to coordinate; the lease remembers who
released it. Once its request has ended (:meth:`RequestLeases.end`), a request
checks out nothing more: every lease it ever had was released by then.
"""

from __future__ import annotations

import collections
import enum
import os
import socket
import threading
import time
import typing as t
from collections.abc import Callable

from .connection import LeasedConnection, socket_id
from .errors import ConnectionReleased
from .names import DEFAULT_POOL, SERVING_THREAD, CancelReason, ReleaseReason, Stat

if t.TYPE_CHECKING:
    import psycopg

    from .pool import PoolHolder
    from .probes import ClientProbe
    from .state import AppState


class Unwatchable(t.Protocol):
    """A watcher registration that a lease drops when it is released."""

    def discard(self, lease: Lease) -> None: ...


#: Seconds a request holds its connection before the watcher registers its client:
#: most requests end sooner and never cost the watcher a system call.
WATCH_DELAY = 0.05


class PendingClients:
    """Leases whose request's client the watcher registers once they have been held
    :data:`WATCH_DELAY` (cancel on disconnect), oldest first.

    The request thread appends its lease (:meth:`Lease.watch_client_later`), and its
    release takes the entry off again when it is the newest (always, in a one-thread
    worker such as gunicorn sync): a request that ended in time leaves the watcher
    nothing to look at. The watcher takes the due entries from the other end
    (:meth:`take_due`).
    """

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: collections.deque[tuple[Lease, ClientProbe, bool]] = collections.deque()

    def add(self, lease: Lease, probe: ClientProbe, eof_means_gone: bool) -> None:
        self._entries.append((lease, probe, eof_means_gone))

    def discard(self, lease: Lease) -> None:
        """Drop *lease*'s entry if it is the newest (else :meth:`take_due` drops it later).

        Never removes another request's entry: one popped by mistake (appended after
        this one, by another thread) is put back at once.
        """
        entries = self._entries
        try:
            last = entries.pop()
        except IndexError:
            return
        if last[0] is not lease:
            entries.append(last)

    def take_due(self, now: float) -> tuple[list[tuple[Lease, ClientProbe, bool]], float | None]:
        """The entries due at *now* whose lease is still held; entries of released
        leases are dropped, due or not.

        :returns: the due entries, and when the oldest entry left is due (None: none left).
        """
        entries = self._entries
        due: list[tuple[Lease, ClientProbe, bool]] = []
        while True:
            try:
                entry = entries.popleft()
            except IndexError:
                return due, None
            lease = entry[0]
            if not lease.active:
                continue
            at = lease.checked_out_at + WATCH_DELAY
            if at > now:
                entries.appendleft(entry)  # still the oldest: wait for it
                return due, at
            due.append(entry)

    def __iter__(self) -> t.Iterator[Lease]:
        """The leases queued now, oldest first (a snapshot)."""
        return iter([entry[0] for entry in tuple(self._entries)])

    def clear(self) -> None:
        """Forget every entry (a forked child: the parent's requests are not its own)."""
        self._entries.clear()


#: The process's leases waiting for the watcher (see :class:`PendingClients`).
PENDING_CLIENTS = PendingClients()


def _shut_down(fd: int, inode: int) -> bool:
    """Shut down the socket *fd* if it is still the one of *inode*; True if done.

    Through a duplicate of the descriptor, so that libpq's own stays open.
    """
    try:
        dup = os.dup(fd)
    except OSError:
        return False
    try:
        if os.fstat(dup).st_ino != inode:
            return False
        sock = socket.socket(fileno=dup)
        dup = -1
        with sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        return False
    finally:
        if dup >= 0:
            os.close(dup)
    return True


class LeaseState(str, enum.Enum):
    """Where a lease is in its life."""

    WAITING = "waiting"
    ACTIVE = "active"
    RELEASING = "releasing"
    RELEASED = "released"


#: The states, read once: on Python 3.11 reading an enum member through its class
#: costs about as much as a function call, and a request reads them ten times.
_WAITING, _ACTIVE = LeaseState.WAITING, LeaseState.ACTIVE
_RELEASING, _RELEASED = LeaseState.RELEASING, LeaseState.RELEASED
#: The states in which :meth:`Lease.sever` may shut the connection's socket down.
_SEVERABLE = frozenset((_ACTIVE, _RELEASING))

#: Set by :func:`flask_reqconn.testing.enable_strict`: wraps the connection get_conn()
#: hands to the app. None (the default) costs one global read per checkout.
handout_wrapper: (
    t.Callable[[Lease, psycopg.Connection[t.Any]], psycopg.Connection[t.Any]] | None
) = None


class Lease:
    """A connection checked out from a pool for one request.

    Created by the pool's checkout; the connection is in ``conn`` while
    :attr:`active`. It holds its request (``owner``) only while it holds the
    connection: once released, it refers to nothing of the request but what the
    request was (method, path, endpoint, serving thread), so that the request's
    objects are freed as soon as the request is over, without the garbage
    collector, as Flask frees its own.
    """

    __slots__ = (
        "conn",
        "handle",
        "owner",
        "method",
        "path",
        "endpoint",
        "thread_id",
        "requested_at",
        "checked_out_at",
        "wait_time",
        "released_at",
        "released_by",
        "checkout_site",
        "leak_reported",
        "cancelled",
        "cancel_uncertain",
        "severed",
        "_sock",
        "watch",
        "handed_out",
        "_state",
        "_lock",
        "_holder",
        "__weakref__",
    )

    def __init__(
        self,
        holder: PoolHolder,
        owner: RequestLeases | None = None,
        checkout_site: str | None = None,
    ) -> None:
        self._holder = holder
        #: the request that may use the connection, until the release (None: anyone,
        #: a lease taken outside a request)
        self.owner = owner
        if owner is not None:
            environ = owner.environ
            self.method: str = environ.get("REQUEST_METHOD", "")
            self.path: str = environ.get("PATH_INFO", "")
            self.endpoint = owner.endpoint
            #: the thread serving the request (the WSGI server's; 0: unknown)
            self.thread_id: int = environ.get(SERVING_THREAD, 0)
        else:
            self.method = self.path = ""
            self.endpoint = None
            self.thread_id = 0
        self.conn: LeasedConnection | None = None
        #: what get_conn() hands to the app: :attr:`conn`, or a strict-mode proxy of it
        self.handle: psycopg.Connection[t.Any] | None = None
        self.requested_at = time.monotonic()
        self.checked_out_at = 0.0
        #: seconds spent waiting for the pool (set at checkout)
        self.wait_time = 0.0
        self.released_at = 0.0
        self.released_by: ReleaseReason | None = None
        #: where the connection was taken (only recorded with leak detection on)
        self.checkout_site = checkout_site
        #: a leak warning was logged for this lease
        self.leak_reported = False
        #: why the watcher cancelled this lease's query (None: never cancelled)
        self.cancelled: CancelReason | None = None
        #: a cancel request failed or timed out: it may still reach the server
        #: later and hit the next borrower, so the connection is discarded
        self.cancel_uncertain = False
        #: the watcher shut the connection's socket down (:meth:`sever`)
        self.severed = False
        #: [(fd, inode)] of the connection's socket, recorded by the request thread at
        #: checkout when :meth:`sever` may be needed: a one-item list, and whoever
        #: pops the item first, :meth:`sever` or :meth:`seal`, decides
        self._sock: list[tuple[int, int]] | None = None
        #: the watcher's registration of the request's client, if any
        self.watch: Unwatchable | None = None
        #: get_conn() gave the connection to the app; False: no statement can have run
        self.handed_out = False
        self._state = _WAITING
        self._lock = threading.Lock()

    @property
    def pool_name(self) -> str:
        return self._holder.name

    def __repr__(self) -> str:
        return (
            f"<Lease {self.pool_name!r} {self._state.value} {self.method} {self.path}"
            f" released_by={self.released_by and self.released_by.value}>"
        )

    @property
    def state(self) -> LeaseState:
        return self._state

    @property
    def active(self) -> bool:
        """True while the connection is checked out and usable by the request."""
        return self._state is _ACTIVE

    @property
    def held_for(self) -> float:
        """Seconds the connection has been (or was) held."""
        if not self.checked_out_at:
            return 0.0
        end = self.released_at or time.monotonic()
        return end - self.checked_out_at

    def describe(self) -> dict[str, t.Any]:
        """A JSON-friendly description, as listed in ``stats()["pools"][...]["holders"]``."""
        return {
            "endpoint": self.endpoint,
            "method": self.method,
            "path": self.path,
            "thread": self.thread_id,
            "held_for": round(self.held_for, 6),
            "checkout_site": self.checkout_site,
        }

    def activate(self, conn: LeasedConnection) -> None:
        """The pool gave *conn*: the lease holds it from now on (called by its pool)."""
        self.conn = conn
        conn.owner = self.owner
        self.handle = conn if handout_wrapper is None else handout_wrapper(self, conn)
        now = self.checked_out_at = time.monotonic()
        self.wait_time = now - self.requested_at
        if self._holder.max_hold is not None:
            # for sever(): the watcher must not call libpq (recorded at connect)
            sock = conn.sock_id or socket_id(conn)
            self._sock = [sock] if sock is not None else None
        self._state = _ACTIVE

    def hand_out(self) -> psycopg.Connection[t.Any]:
        """What ``get_conn()`` gives the app; from now on a statement may have run.

        :raises ConnectionReleased: the lease no longer holds its connection.
        """
        handle = self.handle
        if handle is None or self._state is not _ACTIVE:
            raise ConnectionReleased(
                f"the connection of pool {self.pool_name!r} for this request was already"
                f" given back (released by {self.released_by}); it cannot be used after that"
            )
        self.handed_out = True
        return handle

    def report_leak(self) -> bool:
        """Note that this lease was reported as held too long: True the first time only."""
        if self.leak_reported:
            return False
        self.leak_reported = True
        return True

    def watch_client(self, register: Callable[[Lease], Unwatchable | None]) -> None:
        """Let *register* (the watcher's) watch the request's client, under the lease's
        lock, and only while the lease is held and not cancelled: a lease released
        meanwhile is never registered, and its release drops the registration."""
        with self._lock:
            self.watch = None
            if self._state is _ACTIVE and self.cancelled is None:
                self.watch = register(self)

    def watch_client_later(self, probe: ClientProbe, eof_means_gone: bool) -> None:
        """Have the watcher watch the request's client (*probe*) if the lease is still
        held after :data:`WATCH_DELAY`, and cancel its query if the client leaves.

        Only an entry in :data:`PENDING_CLIENTS` until then, which the release drops.
        """
        if self.watch is None:
            self.watch = PENDING_CLIENTS
            PENDING_CLIENTS.add(self, probe, eof_means_gone)

    def release(self, reason: ReleaseReason) -> bool:
        """Give the connection back to its pool, once.

        Safe to call from any thread, any number of times: only the first call
        while the lease is active does anything.

        :returns: True if this call released the connection.
        """
        with self._lock:
            if self._state is not _ACTIVE:
                return False
            self.released_by = reason
            self.released_at = time.monotonic()
            self._state = _RELEASING
            if self.conn is not None:  # from now on, no code of the request may use it
                self.conn.owner = self
        watch = self.watch
        if watch is not None:
            self.watch = None
            watch.discard(self)
        try:
            self._holder.give_back(self, reason)
        finally:
            self._state = _RELEASED
            self.owner = None  # the connection may keep this lease: not its request
        return True

    def count(self, stat: Stat) -> None:
        """Count *stat* in the lease's pool (for the watcher, which acts on leases)."""
        self._holder.counters.add(stat)

    def cancel(self, reason: CancelReason, timeout: float) -> bool:
        """Cancel the statement running on the connection, from another thread.

        Done under the lease's lock, and only while the lease is active: the
        request cannot hand the connection back (and another request cannot
        get it) until the cancel request has reached the server, so a cancel
        never hits the next user of the connection. Never closes or returns
        the connection: that stays with the request's own thread.

        :returns: True if a cancel was sent by this call.
        """
        with self._lock:
            if self._state is not _ACTIVE or self.cancelled is not None:
                return False
            self.cancelled = reason
            conn = self.conn
            if conn is None:  # pragma: no cover - active leases have a connection
                return False
            try:
                if hasattr(conn, "cancel_safe"):
                    conn.cancel_safe(timeout=timeout)
                else:  # pragma: no cover - psycopg < 3.2
                    conn.cancel()
            except Exception:
                # timed out or failed: the request may still be on its way (a
                # frozen server accepts it and reads it later)
                self.cancel_uncertain = True
                return False
        return True

    def sever(self, reason: CancelReason | None = None) -> bool:
        """Shut the connection's socket down, from another thread, without libpq.

        For a server that cannot be reached by a cancel (frozen, or a path
        that drops packets): the request thread blocked on the socket wakes up
        with an ``OperationalError`` and the connection is discarded at
        release. Only a socket recorded at checkout, and only if it is still
        the same socket (same inode), is touched; the descriptor is duplicated
        so libpq's own stays open until the request thread closes it.

        Also while the lease is being handed back (a ``ROLLBACK`` blocked on a
        frozen server), until :meth:`seal` is called before the connection
        goes back to the pool.

        :param reason: why, recorded as :attr:`cancelled` if no cancel was sent before.
        :returns: True if the socket was shut down by this call.
        """
        with self._lock:
            if self._sock is None or self.severed or self._state not in _SEVERABLE:
                return False
            try:
                recorded = self._sock.pop()
            except IndexError:  # sealed: the connection is going back to the pool
                return False
            if reason is not None and self.cancelled is None:
                self.cancelled = reason
            if not _shut_down(*recorded):
                self._sock.append(recorded)  # a later tick may try again
                return False
            self.severed = True
            # the request may hold on to the connection for long yet (a stream whose
            # client reads nothing): its pool opens another one now
            self._holder.replace(self.conn)
        return True

    def seal(self) -> bool:
        """Forbid :meth:`sever` from now on: the connection is about to be returned.

        Called by the hand-back, on the request's thread, before the connection
        goes back to the pool, where another request may take it. No lock on the
        common path: taking the recorded socket out of its list is one step, and
        if :meth:`sever` took it first, this waits under the lock until the sever
        is done.

        :returns: True if the socket was (or is being) shut down: discard the connection.
        """
        sock = self._sock
        if sock is None:
            # never recorded (no REQCONN_MAX_HOLD): sever() cannot run, so
            # ``severed`` cannot change any more
            return self.severed
        try:
            sock.pop()
        except IndexError:
            with self._lock:  # sever() took it: let it finish
                return True
        self._sock = None  # sealed for good: a second call changes nothing
        return False

    def refusal(self) -> str:
        """Why code may not use the connection this lease gave back (as its owner)."""
        by = self.released_by.value if self.released_by is not None else "unknown"
        return (
            f"this connection was handed back by {self.method} {self.path} (pool"
            f" {self.pool_name!r}, released by {by}); it may be serving another request"
            " now. Call get_conn() inside each request instead of keeping the connection;"
            " for background work use 'with reqconn.connection() as conn:'"
        )


class RequestLeases:
    """The leases of one request, one per pool at most.

    Kept on the request object (not on ``g``, which Flask may share between
    requests) and in the WSGI environ, so that both the request hooks and the
    WSGI wrapper (which runs after the context is gone) see it.
    """

    __slots__ = (
        "leases",
        "streamed",
        "client_gone",
        "route",
        "routed",
        "probe",
        "ended",
        "environ",
        "endpoint",
        "state",
        "__weakref__",
    )

    def __init__(
        self,
        environ: dict[str, t.Any] | None = None,
        endpoint: str | None = None,
        state: AppState | None = None,
    ) -> None:
        #: the request's WSGI environ and endpoint, read once
        self.environ: dict[str, t.Any] = environ if environ is not None else {}
        self.endpoint = endpoint
        #: the app's flask-reqconn state (None: a request that ended with no connection)
        self.state = state
        self.leases: dict[str, Lease] = {}
        #: the response is an iterator: release waits for its ``close()``.
        self.streamed = False
        #: the client was seen gone; no new checkouts for this request.
        self.client_gone = False
        #: the pool ``get_conn()`` without a name uses (a read pool for
        #: read-only views)
        self.route = DEFAULT_POOL
        #: :attr:`route` was decided (by the first ``get_conn()`` without a name)
        self.routed = False
        #: how to see the request's client, resolved at the first checkout
        self.probe: ClientProbe | None = None
        #: the request is over (:meth:`end`): no more checkouts
        self.ended = False

    def refusal(self) -> str:
        """Why code outside this request may not use its connection (as its owner)."""
        lease = next(iter(self.leases.values()), None)
        held = f" ({lease.method} {lease.path}, thread {lease.thread_id})" if lease else ""
        return (
            f"this connection belongs to another request{held}; it cannot be used from"
            " here (a reference kept from an earlier request, or a thread the view started:"
            " run such a thread in the request's context, contextvars.copy_context().run)."
            " Call get_conn() in the request itself; for background work use"
            " 'with reqconn.connection() as conn:'"
        )

    def has_active(self) -> bool:
        for lease in self.leases.values():
            if lease._state is _ACTIVE:
                return True
        return False

    def end(self, reason: ReleaseReason) -> None:
        """The request is over: release every active lease (by *reason*), and refuse
        any later checkout (a thread that outlived the request, with a copy of its
        context). Never raises."""
        self.ended = True
        for lease in tuple(self.leases.values()):
            if lease._state is _ACTIVE:
                lease.release(reason)
