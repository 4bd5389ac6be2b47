"""Who may use a connection: only the request (or block) that holds it.

The pools of flask-reqconn make :class:`LeasedConnection` objects. Each knows its
owner: the request that holds it (its :class:`~flask_reqconn.lease.RequestLeases`),
a ``reqconn.connection()`` block (:class:`Block`), or, once given back, the
:class:`~flask_reqconn.lease.Lease` that ended. The code running now says who it
is through :data:`current_owner`, a context variable the request's checkout sets.
A statement, a commit or a rollback from anyone but the owner raises
:class:`~flask_reqconn.ConnectionReleased`, whose message the owner writes
(its ``refusal()``): a connection kept past its request never acts inside
another request's transaction.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import typing as t
from collections.abc import Iterator

import psycopg

from .errors import ConnectionReleased

#: Who is running now, as far as connections care: the request (its leases) or a
#: ``reqconn.connection()`` block. Set in the request's context by its first
#: checkout: a thread the view starts has a context of its own, and code that runs
#: after the request belongs to another.
current_owner: contextvars.ContextVar[object] = contextvars.ContextVar(
    "flask_reqconn_owner", default=None
)


class Owner(t.Protocol):
    """What owns a connection: it says why others may not use it."""

    def refusal(self) -> str: ...


class LeasedConnection(psycopg.Connection[t.Any]):
    """psycopg's connection, usable only by its owner (see the module docstring).

    Running a statement (``execute``, ``cursor``), ``commit``, ``rollback``,
    ``transaction`` and ``pipeline`` check the owner; everything else is
    psycopg's own. ``cancel()`` and ``close()`` are not checked: flask-reqconn's
    watcher and hand-back use them.
    """

    #: the request or block that may use the connection, the lease that gave it
    #: back, or None (the pool's own, never handed out)
    owner: Owner | None = None
    #: (descriptor, inode) of its socket, once asked (:func:`socket_id`)
    sock_id: tuple[int, int] | None = None

    def _check_owner(self) -> None:
        owner = self.owner
        if owner is not None and owner is not current_owner.get():
            raise ConnectionReleased(owner.refusal())

    def cursor(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
        self._check_owner()
        return super().cursor(*args, **kwargs)

    def commit(self) -> None:
        self._check_owner()
        super().commit()

    def rollback(self) -> None:
        self._check_owner()
        super().rollback()

    def transaction(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
        self._check_owner()
        return super().transaction(*args, **kwargs)

    @contextlib.contextmanager
    def pipeline(self) -> Iterator[t.Any]:
        self._check_owner()
        with super().pipeline() as pipeline:
            yield pipeline


def socket_id(conn: psycopg.Connection[t.Any]) -> tuple[int, int] | None:
    """(descriptor, inode) of *conn*'s socket, to shut it down from another thread
    without libpq and only while it is still the same socket. Asked once per
    connection (its socket never changes)."""
    known = getattr(conn, "sock_id", None)
    if known is not None:
        return known  # type: ignore[no-any-return]
    try:
        fd = conn.pgconn.socket
        found = (fd, os.fstat(fd).st_ino)
    except Exception:
        return None
    if isinstance(conn, LeasedConnection):
        conn.sock_id = found
    return found


def own(conn: psycopg.Connection[t.Any] | None, owner: Owner | None) -> None:
    """Make *owner* the only one who may use *conn* from now on."""
    if isinstance(conn, LeasedConnection):
        conn.owner = owner


class Block:
    """The owner of a connection taken by ``reqconn.connection()`` (outside requests)."""

    __slots__ = ("pool_name", "ended")

    def __init__(self, pool_name: str, *, ended: bool = False) -> None:
        self.pool_name = pool_name
        #: the block is over: its connection is no one's to use
        self.ended = ended

    @classmethod
    @contextlib.contextmanager
    def holding(cls, conn: psycopg.Connection[t.Any], pool_name: str) -> Iterator[None]:
        """Own *conn* for the block; commit it when the block succeeds.

        The commit is the block's own, whichever context ends it (SQLAlchemy may
        close its connection from another): it is not checked.
        """
        block = cls(pool_name)
        own(conn, block)
        token = current_owner.set(block)
        try:
            yield
        except BaseException:
            own(conn, cls(pool_name, ended=True))
            raise  # the hand-back rolls back
        finally:
            with contextlib.suppress(ValueError):  # ended in another context: nothing to undo
                current_owner.reset(token)
        own(conn, cls(pool_name, ended=True))
        if not conn.closed:
            psycopg.Connection.commit(conn)

    def refusal(self) -> str:
        if self.ended:
            return (
                f"this connection (pool {self.pool_name!r}) was used after its"
                " 'with reqconn.connection() as conn:' block ended; it is back in the pool"
            )
        return (
            f"this connection (pool {self.pool_name!r}) belongs to a"
            " 'with reqconn.connection() as conn:' block; use it inside that block only"
        )
