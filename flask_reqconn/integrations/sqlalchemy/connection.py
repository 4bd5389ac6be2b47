"""The DBAPI connection SQLAlchemy sees on flask-reqconn: a wrapper that dies with the lease."""

from __future__ import annotations

import contextlib
import typing as t
from collections.abc import Callable

import psycopg
from psycopg.rows import tuple_row

from ...errors import ConnectionReleased

if t.TYPE_CHECKING:
    from ...lease import Lease

#: Protects work the request did before SQLAlchemy's first use in the process: the
#: dialect's initialisation ends with a ROLLBACK.
INIT_SAVEPOINT = "flask_reqconn_sqlalchemy_init"


class RequestConnection:
    """The DBAPI connection SQLAlchemy sees: a wrapper of a flask-reqconn connection.

    Everything is passed through to the connection ``get_conn()`` hands out (in
    :ref:`strict mode <strict-mode>`, its checking proxy, so that cursors and
    ``driver_connection`` kept past the request raise too) while the request's lease (or,
    outside requests, the connection of its own) is held. Afterwards ``rollback()``
    and ``close()`` do nothing, attribute changes are ignored, and anything else raises
    :class:`~flask_reqconn.ConnectionReleased`. ``close()`` never closes the psycopg
    connection. ``driver_connection`` of SQLAlchemy's pool entries is the psycopg
    connection itself.
    """

    __slots__ = ("_conn", "_lease", "_release", "_record", "_savepoint", "_sessions", "__weakref__")

    _conn: psycopg.Connection[t.Any] | None
    _lease: Lease | None
    _release: Callable[[], None] | None
    #: SQLAlchemy's pool entry for this wrapper (a ``_ConnectionRecord``)
    _record: t.Any
    #: the dialect's first initialisation runs inside a savepoint: rollback() goes to it
    _savepoint: bool
    #: the sessions that began a transaction on it, with their SQLAlchemy connection
    #: (see :mod:`.sessions`); None until the first
    _sessions: list[tuple[t.Any, t.Any]] | None

    def __init__(
        self,
        conn: psycopg.Connection[t.Any],
        lease: Lease | None,
        *,
        release: Callable[[], None] | None = None,
    ) -> None:
        object.__setattr__(self, "_conn", conn)
        object.__setattr__(self, "_lease", lease)
        object.__setattr__(self, "_release", release)
        object.__setattr__(self, "_record", None)
        object.__setattr__(self, "_savepoint", False)
        object.__setattr__(self, "_sessions", None)

    def __repr__(self) -> str:
        state = "usable" if self._target() is not None else "released"
        return f"<RequestConnection {state} {'request' if self._lease else 'own'}>"

    def _target(self) -> psycopg.Connection[t.Any] | None:
        conn = self._conn
        lease = self._lease
        if conn is None or (lease is not None and (lease.handle is not conn or not lease.active)):
            return None
        return conn

    def _live(self) -> psycopg.Connection[t.Any]:
        conn = self._target()
        if conn is None:
            raise ConnectionReleased(self._released_message())
        return conn

    def _released_message(self) -> str:
        lease = self._lease
        where = f" of {lease.method} {lease.path}" if lease is not None and lease.method else ""
        return (
            f"SQLAlchemy used the connection of a request{where} after flask-reqconn gave it"
            " back at the end of that request, and rolled back what was left open. A"
            " transaction begun in a request cannot go on after it: a"
            " 'with session.begin():' or 'with connection.begin():' block still open when"
            " the request ended, a Connection from engine.connect() kept past its request,"
            " or a streamed body not wrapped in flask.stream_with_context(). End the block"
            " and close the Connection inside the request. (Sessions without such a block"
            " start over on the next request's connection by themselves.)"
        )

    def _detach(self) -> None:
        release = self._release
        object.__setattr__(self, "_conn", None)
        object.__setattr__(self, "_release", None)
        if release is not None:
            release()

    # -- DBAPI ---------------------------------------------------------------

    def cursor(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
        # SQLAlchemy reads rows by position: a row_factory set for get_conn() (dict_row
        # in REQCONN_CONNECT_ARGS) must not reach its cursors
        if "row_factory" not in kwargs:
            kwargs["row_factory"] = tuple_row
        return self._live().cursor(*args, **kwargs)

    def commit(self) -> None:
        self._live().commit()

    def rollback(self) -> None:
        conn = self._target()
        if conn is None:
            return  # flask-reqconn rolled back when it took the connection back
        if self._savepoint:
            conn.execute(f"ROLLBACK TO SAVEPOINT {INIT_SAVEPOINT}")
        else:
            conn.rollback()

    def close(self) -> None:
        """Never closes the psycopg connection: flask-reqconn owns it."""

    @property
    def closed(self) -> bool:
        conn = self._target()
        return conn is None or conn.closed

    @property
    def broken(self) -> bool:
        conn = self._target()
        return conn is not None and conn.broken

    @property
    def driver_connection(self) -> psycopg.Connection[t.Any]:
        return self._live()

    def add_notice_handler(self, callback: Callable[..., t.Any]) -> None:
        # ``connect`` fires once per request: keep one copy of each handler.
        conn = self._live()
        try:
            conn.remove_notice_handler(callback)
        except ValueError:  # not added yet (a try, not contextlib.suppress: once per request)
            pass
        conn.add_notice_handler(callback)

    def add_notify_handler(self, callback: Callable[..., t.Any]) -> None:
        conn = self._live()
        with contextlib.suppress(ValueError):
            conn.remove_notify_handler(callback)
        conn.add_notify_handler(callback)

    def __getattr__(self, name: str) -> t.Any:
        return getattr(self._live(), name)

    def __setattr__(self, name: str, value: t.Any) -> None:
        if name in RequestConnection.__slots__:
            object.__setattr__(self, name, value)
            return
        conn = self._target()
        if conn is not None:  # after the lease: SQLAlchemy's cleanup, nothing to undo
            setattr(conn, name, value)
