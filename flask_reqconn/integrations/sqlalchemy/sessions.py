"""Sessions that outlive their request start over on the next request's connection.

A ``Session`` can live longer than the request whose connection it used: Flask-SQLAlchemy's
and Flask-SQLAlchemy-Lite's sessions live as long as the application context, which a test
suite often pushes around the test client (Flask then reuses it for every request); a
thread-local ``scoped_session`` lives as long as its thread. flask-reqconn gives the
connection back at the end of the request and rolls back what was left open. This module
makes SQLAlchemy know it: each session that still had a transaction on that connection is
rolled back on SQLAlchemy's side, which sends nothing (the connection wrapper is dead by
then), expires its objects and ends its transaction, as ``session.rollback()`` does. Its
next use begins a new transaction on the connection of the request it runs in.

How, in two small parts:

* a ``Session`` ``after_begin`` listener (one, for every ``Session`` class, added when the
  first :class:`~flask_reqconn.integrations.sqlalchemy.RequestPool` is made) notes each
  session that begins a transaction on a request's connection, in a dict kept per thread
  (by :class:`RequestConnection`);
* a :class:`~flask_reqconn.stats.Listener` on the app's pools, added by
  :func:`watch`, rolls those sessions back when a connection comes back to a pool, or is
  taken from it, in the same thread (the release of a request's connection runs in that
  request's thread: ``teardown_request``, or the response's ``close()``).

Only the thread that used a session touches it. A session whose transaction ended before
(committed, closed) is left alone. A session inside a ``with session.begin():`` block is
left alone too: the block cannot go on in another request, and its next statement raises
:class:`~flask_reqconn.ConnectionReleased` saying so.
"""

from __future__ import annotations

import logging
import threading
import typing as t
import weakref

from sqlalchemy import event
from sqlalchemy.orm import Session

from .connection import RequestConnection

if t.TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import SessionTransaction

    from ...names import ReleaseReason, Stat
    from ...state import AppState

__all__ = ["install", "sweep", "watch"]

logger = logging.getLogger(__name__)


class _Pending(threading.local):
    """The request connections with sessions on them, used by this thread: each with
    those sessions and their SQLAlchemy connection."""

    def __init__(self) -> None:
        self.sessions: dict[RequestConnection, list[tuple[Session, Connection]]] = {}


_pending = _Pending()
_install_lock = threading.Lock()
_installed = False
#: the app states whose pools have the sweeping listener
_watched: weakref.WeakSet[AppState] = weakref.WeakSet()


def install() -> None:
    """Add the ``after_begin`` listener to ``Session`` (and so every subclass), once."""
    global _installed
    with _install_lock:
        if not _installed:
            event.listen(Session, "after_begin", _after_begin)
            _installed = True


def watch(state: AppState) -> None:
    """Sweep this thread's sessions at every checkout and release of *state*'s pools."""
    if state not in _watched:
        with _install_lock:
            if state not in _watched:
                state.add_listener(_SWEEPER)
                _watched.add(state)


def _after_begin(session: Session, transaction: SessionTransaction, connection: Connection
                 ) -> None:  # fmt: skip
    proxy = connection.connection.dbapi_connection
    if type(proxy) is not RequestConnection or proxy.lease is None:
        return  # another engine's connection, or a connection of its own (no request)
    pending = _pending.sessions
    entries = pending.get(proxy)
    if entries is None:
        if pending:
            sweep(skip=session)  # leases released in another thread: keep the dict short
        pending[proxy] = [(session, connection)]
    elif all(s is not session or c is not connection for s, c in entries):
        entries.append((session, connection))


def sweep(skip: Session | None = None) -> None:
    """Roll back, on SQLAlchemy's side, this thread's sessions whose request connection
    was given back. Never raises.

    :param skip: a session in the middle of beginning a transaction: left alone.
    """
    pending = _pending.sessions
    if not pending:
        return
    ended = [proxy for proxy in pending if proxy.lease is None or not proxy.lease.active]
    for proxy in ended:
        for session, connection in pending.pop(proxy, ()):
            if session is skip or connection.closed or not connection.in_transaction():
                continue  # that transaction already ended
            # SQLAlchemy's own marker of a ``with session.begin():`` block in progress
            if getattr(session, "_trans_context_manager", None) is not None:
                continue
            try:
                if len(session.identity_map) or session.new:
                    session.rollback()  # expires its objects, drops those it flushed
                else:
                    session.close()  # no objects: the same, without the snapshot work
            except Exception as error:  # a listener of the app's: never fail a release
                logger.warning(
                    "could not roll back a session whose request connection was given"
                    " back: %r",
                    error,
                )


class _Sweeper:
    """The :class:`~flask_reqconn.stats.Listener` that calls :func:`sweep`."""

    def checked_out(self, pool: str, wait: float) -> None:
        if _pending.sessions:
            sweep()

    def released(self, pool: str, reason: ReleaseReason, held: float) -> None:
        if _pending.sessions:
            sweep()

    def counted(self, pool: str, name: Stat, amount: int) -> None:
        pass


_SWEEPER = _Sweeper()
