"""The DBAPI connection SQLAlchemy sees on flask-reqconn: a wrapper that dies with the lease."""

from __future__ import annotations

import contextlib
import typing as t
from collections.abc import Callable

import psycopg
from psycopg.rows import tuple_row

from ...errors import ConnectionReleased

if t.TYPE_CHECKING:
    from sqlalchemy.pool import ConnectionPoolEntry

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

    Its state changes only through its own methods: ``lease`` and ``record`` are
    read-only from outside (setting them raises :exc:`AttributeError`).
    """

    __slots__ = ("_conn", "lease", "_release", "record", "_savepoint", "__weakref__")

    _conn: psycopg.Connection[t.Any] | None
    #: the request's lease of the connection; None for a connection of its own (no request)
    lease: Lease | None
    _release: Callable[[], None] | None
    #: SQLAlchemy's pool entry for this wrapper while it may be handed out again (see
    #: :meth:`keep_record`); None before the first and after SQLAlchemy invalidated it
    record: ConnectionPoolEntry | None
    #: the dialect's first initialisation runs inside a savepoint: rollback() goes to it
    _savepoint: bool

    def __init__(
        self,
        conn: psycopg.Connection[t.Any],
        lease: Lease | None,
        *,
        release: Callable[[], None] | None = None,
    ) -> None:
        object.__setattr__(self, "_conn", conn)
        object.__setattr__(self, "lease", lease)
        object.__setattr__(self, "_release", release)
        object.__setattr__(self, "record", None)
        object.__setattr__(self, "_savepoint", False)

    def __repr__(self) -> str:
        state = "usable" if self.usable_connection() is not None else "released"
        return f"<RequestConnection {state} {'request' if self.lease else 'own'}>"

    def usable_connection(self) -> psycopg.Connection[t.Any] | None:
        """The connection this wrapper passes everything to; None once it stopped working
        (its lease ended, or :meth:`detach`)."""
        conn = self._conn
        lease = self.lease
        if conn is None or (lease is not None and (lease.handle is not conn or not lease.active)):
            return None
        return conn

    def _live(self) -> psycopg.Connection[t.Any]:
        conn = self.usable_connection()
        if conn is None:
            raise ConnectionReleased(self._released_message())
        return conn

    def _released_message(self) -> str:
        lease = self.lease
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

    # -- for RequestPool ---------------------------------------------------------

    def detach(self) -> None:
        """Stop working now (SQLAlchemy closed or checked in the wrapper); a connection
        of its own is given back. The psycopg connection is never closed here."""
        release = self._release
        object.__setattr__(self, "_conn", None)
        object.__setattr__(self, "_release", None)
        if release is not None:
            release()

    def keep_record(self, record: ConnectionPoolEntry) -> None:
        """Keep SQLAlchemy's pool entry made for this wrapper: the request's later
        checkouts hand it out again, until :meth:`forget_record`."""
        object.__setattr__(self, "record", record)

    def forget_record(self, record: ConnectionPoolEntry) -> None:
        """SQLAlchemy invalidated *record* (hard or soft): it is not handed out again."""
        if self.record is record:
            object.__setattr__(self, "record", None)

    def use_init_savepoint(self, use: bool) -> None:
        """Whether :meth:`rollback` rolls back to :data:`INIT_SAVEPOINT` (which the pool
        sets around the dialect's first initialisation) instead of the transaction."""
        object.__setattr__(self, "_savepoint", use)


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
        conn = self.usable_connection()
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
        conn = self.usable_connection()
        return conn is None or conn.closed

    @property
    def broken(self) -> bool:
        conn = self.usable_connection()
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
            raise AttributeError(f"RequestConnection.{name} is changed by its own methods only")
        conn = self.usable_connection()
        if conn is not None:  # after the lease: SQLAlchemy's cleanup, nothing to undo
            setattr(conn, name, value)
