"""SQLAlchemy engines whose connections are the request's connection.

:class:`RequestPool` is an SQLAlchemy pool class. An engine made with it never opens a
connection itself. In a request, every checkout is the request's connection from
:func:`flask_reqconn.get_conn` (taken eagerly or lazily, as configured, and given back by
flask-reqconn with all its guarantees). Outside a request, in an application context (CLI
commands, scripts, tests), every checkout is a connection of its own from
:meth:`ReqConn.connection <flask_reqconn.ReqConn.connection>`, cleaned the same way and
given back when SQLAlchemy checks it in::

    from flask_reqconn.integrations.sqlalchemy import create_engine, engine_options

    engine = create_engine()                    # SQLAlchemy Core and ORM
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = engine_options()   # Flask-SQLAlchemy

SQLAlchemy sees a thin DBAPI-level wrapper of the psycopg connection. It stops working when
the lease ends, so a session closed after flask-reqconn gave the connection back (Flask
runs ``teardown_appcontext`` after ``teardown_request``) cannot touch a connection that
another request may already hold. SQLAlchemy never closes, pings or resets a connection
flask-reqconn owns. See the SQLAlchemy page of the documentation.

Importing this module imports SQLAlchemy (the ``sqlalchemy`` extra); ``import
flask_reqconn`` does not.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import typing as t
from collections.abc import Callable

import psycopg
import sqlalchemy as sa
from flask import current_app, has_app_context, has_request_context, request
from psycopg.pq import TransactionStatus
from sqlalchemy import event, exc
from sqlalchemy.pool import ConnectionPoolEntry, Pool

from ...checkout import current_leases, get_conn, on_query_canceled
from ...connection import own
from ...errors import ReqConnError
from ...lost import database_unavailable, lost_lease
from ...state import state_of
from . import sessions
from .connection import INIT_SAVEPOINT, RequestConnection

if t.TYPE_CHECKING:
    from sqlalchemy.engine import Dialect
    from sqlalchemy.engine.interfaces import DBAPIConnection, ExceptionContext

    from ...lease import Lease
    from ...state import AppState

__all__ = ["RequestConnection", "RequestPool", "create_engine", "engine_options"]

logger = logging.getLogger("flask_reqconn.integrations.sqlalchemy")

#: The URL of an engine on flask-reqconn: it only selects the dialect. The connection
#: parameters are flask-reqconn's (``REQCONN_CONNINFO``).
DEFAULT_URL = "postgresql+psycopg://"



class RequestPool(Pool):
    """An SQLAlchemy pool that hands out flask-reqconn's connections.

    Give it to an engine as ``poolclass`` (:func:`engine_options` and
    :func:`create_engine` do). It needs the psycopg dialect
    (``postgresql+psycopg://``); the URL's host, database and credentials are not used.
    The pool options of SQLAlchemy that would manage the connection a second time are
    refused: ``pool_pre_ping``, ``pool_recycle``, ``pool_reset_on_return`` (other than
    ``None``), and ``pool_size``, ``max_overflow``, ``pool_timeout`` (SQLAlchemy rejects
    those itself for this pool class).

    :param creator: the engine's connect function; kept for ``recreate()``, never called.
    :param reqconn_pool: the flask-reqconn pool name (engine option ``reqconn_pool``).
        ``None``: what :func:`~flask_reqconn.get_conn` without a name gives, which
        follows :meth:`~flask_reqconn.ReqConn.read_only` routing.
    :raises sqlalchemy.exc.ArgumentError: an option this pool cannot honour, naming it.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        creator: t.Any,
        reqconn_pool: str | None = None,
        recycle: int = -1,
        echo: t.Any = None,
        logging_name: str | None = None,
        reset_on_return: t.Any = None,
        events: list[tuple[Callable[..., t.Any], str]] | None = None,
        dialect: t.Any = None,
        pre_ping: bool = False,
        _dispatch: t.Any = None,
    ) -> None:
        if pre_ping:
            raise exc.ArgumentError(
                "pool_pre_ping: flask-reqconn checks its connections itself; remove the option"
            )
        if recycle != -1:
            raise exc.ArgumentError(
                "pool_recycle: flask-reqconn's pool replaces old connections; set"
                " REQCONN_MAX_LIFETIME instead"
            )
        if reset_on_return not in (None, False, "none"):
            raise exc.ArgumentError(
                "pool_reset_on_return: flask-reqconn rolls back and resets every connection"
                " when it comes back; leave the option unset (None)"
            )
        if dialect is not None:
            _check_dialect(dialect)
            dialect = _PoolDialect(dialect)
        self._sa_creator = creator
        self._reqconn_pool = reqconn_pool
        self._environ_key = f"flask_reqconn.sqlalchemy.{id(self):x}"
        self._handing = threading.local()
        self._initialized = False
        sessions.install()
        # Before the app's listeners on the engine or this pool (and those recreate()
        # copies, which then skip it), so that one that raises cannot keep it from running.
        for identifier in ("invalidate", "soft_invalidate"):
            event.listen(self, identifier, _forget_record)
        super().__init__(
            t.cast(t.Any, self._hand_over),
            recycle=-1,
            echo=echo,
            logging_name=logging_name,
            reset_on_return=None,
            events=events,
            dialect=dialect,
            pre_ping=False,
            _dispatch=_dispatch,
        )

    def status(self) -> str:
        return f"RequestPool(flask-reqconn pool {self._reqconn_pool or 'of get_conn()'!s})"

    def recreate(self) -> RequestPool:
        dialect = self._dialect
        return self.__class__(
            self._sa_creator,
            reqconn_pool=self._reqconn_pool,
            echo=self.echo,
            logging_name=self._orig_logging_name,
            _dispatch=self.dispatch,
            dialect=dialect.wrapped if isinstance(dialect, _PoolDialect) else None,
        )

    def dispose(self) -> None:
        """Nothing to do: the connections belong to flask-reqconn."""

    # -- checkout and checkin --------------------------------------------------

    def _do_get(self) -> ConnectionPoolEntry:
        if has_request_context():
            return self._request_record()
        return self._private_record()

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        proxy = record.dbapi_connection
        if isinstance(proxy, RequestConnection) and proxy.lease is None:
            proxy.detach()  # a connection of its own: give it back now

    def _close_connection(self, connection: DBAPIConnection, *, terminate: bool = False) -> None:
        # SQLAlchemy "closes" on invalidation and failed connect events: the wrapper
        # stops working; the psycopg connection stays flask-reqconn's, which discards it
        # at hand-back if it is broken.
        if isinstance(connection, RequestConnection):
            connection.detach()
        else:  # pragma: no cover - only wrappers are ever handed out
            super()._close_connection(connection, terminate=terminate)

    def _invalidate(
        self,
        connection: t.Any,
        exception: BaseException | None = None,
        _checkin: bool = True,
    ) -> None:
        # A disconnect on one connection says nothing about the others (other requests
        # hold them): never invalidate the whole pool, only this connection.
        if _checkin and getattr(connection, "is_valid", False):
            connection.invalidate(exception)

    def _request_record(self) -> ConnectionPoolEntry:
        conn = get_conn(self._reqconn_pool)  # in strict mode, its checking proxy
        lease = _lease_of(conn, self._reqconn_pool)
        environ = request._get_current_object().environ  # type: ignore[attr-defined]
        proxy = environ.get(self._environ_key)
        if not isinstance(proxy, RequestConnection) or proxy.usable_connection() is not conn:
            proxy = RequestConnection(conn, lease)
            environ[self._environ_key] = proxy
            # sessions left on it are rolled back when the lease ends (see .sessions)
            sessions.watch(state_of())
        # The request's record, unless SQLAlchemy invalidated it: a hard invalidation
        # took the wrapper out of it; a soft one (or a hard one that a listener
        # interrupted), which leaves it in, made the wrapper forget it (_forget_record).
        # The pool itself is never invalidated as a whole (see _invalidate).
        record = proxy.record
        if record is not None and record.dbapi_connection is proxy:
            return record
        record = self._new_record(proxy, conn)
        proxy.keep_record(record)
        return record

    def _private_record(self) -> ConnectionPoolEntry:
        if not has_app_context():
            raise ReqConnError(
                "this SQLAlchemy engine takes its connections from flask-reqconn: use it in"
                " a request or inside 'with app.app_context():' (Alembic's env.py and"
                " scripts: run the migrations or the script inside it; in a streamed"
                " response, wrap the generator with flask.stream_with_context())"
            )
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        state: AppState = state_of(app)
        cm = state.ext.connection(self._reqconn_pool, app=app)
        # The block's bookkeeping of who runs now (flask_reqconn.connection) happens in a
        # context of its own: the check-in may come from another context (a request
        # that used a session begun in a test body), whose own must stay as it is.
        context = contextvars.copy_context()
        conn = context.run(cm.__enter__)
        # Until the check-in the connection is SQLAlchemy's, used from whatever runs
        # the session (the test body, then a view, in one application context); the
        # wrapper stops working at the check-in, and the block's end gives the
        # connection back its refusing owner.
        own(conn, None)
        proxy = RequestConnection(conn, None, release=_closer(context, cm, conn))
        try:
            return self._new_record(proxy, conn)
        except BaseException:
            proxy.detach()
            raise

    def _new_record(
        self, proxy: RequestConnection, conn: psycopg.Connection[t.Any]
    ) -> ConnectionPoolEntry:
        """A new SQLAlchemy record for *proxy*: fires ``connect`` (and the dialect's
        one-time initialisation on the first one)."""
        guard = not self._initialized and (
            conn.pgconn.transaction_status == TransactionStatus.INTRANS
        )
        if guard:
            conn.execute(f"SAVEPOINT {INIT_SAVEPOINT}")
            proxy.use_init_savepoint(True)
        self._handing.proxy = proxy
        try:
            record = self._create_connection()
        except BaseException:
            if guard and conn.pgconn.transaction_status == TransactionStatus.INERROR:
                with contextlib.suppress(psycopg.Error):
                    conn.execute(f"ROLLBACK TO SAVEPOINT {INIT_SAVEPOINT}")
            raise
        finally:
            self._handing.proxy = None
            if guard:
                proxy.use_init_savepoint(False)
                if conn.pgconn.transaction_status == TransactionStatus.INTRANS:
                    conn.execute(f"RELEASE SAVEPOINT {INIT_SAVEPOINT}")
        self._initialized = True
        return record

    def _hand_over(self, record: ConnectionPoolEntry) -> RequestConnection:
        proxy: RequestConnection | None = getattr(self._handing, "proxy", None)
        if proxy is None:  # pragma: no cover - recycling is disabled
            raise ReqConnError("RequestPool cannot reconnect a record by itself")
        return proxy


class _PoolDialect:
    """The engine's dialect as the pool sees it: ``driver_connection`` is psycopg's."""

    __slots__ = ("wrapped",)

    def __init__(self, dialect: Dialect) -> None:
        self.wrapped = dialect

    def __getattr__(self, name: str) -> t.Any:
        return getattr(self.wrapped, name)

    def get_driver_connection(self, connection: t.Any) -> t.Any:
        if isinstance(connection, RequestConnection):
            return connection.driver_connection
        return self.wrapped.get_driver_connection(connection)  # pragma: no cover


def _forget_record(dbapi_connection: t.Any, record: ConnectionPoolEntry, exception: t.Any) -> None:
    """The pool's ``invalidate`` and ``soft_invalidate`` listener: the request's later
    checkouts do not hand *record* out again (SQLAlchemy would reconnect it, which this
    pool cannot do), but a new one for the same wrapper."""
    if isinstance(dbapi_connection, RequestConnection):
        dbapi_connection.forget_record(record)


def _check_dialect(dialect: t.Any) -> None:
    if getattr(dialect, "name", None) != "postgresql" or getattr(dialect, "driver", None) != (
        "psycopg"
    ):
        raise exc.ArgumentError(
            "RequestPool needs the psycopg dialect: use the URL 'postgresql+psycopg://'"
            f" (got {dialect.name}+{dialect.driver})"
        )
    if getattr(dialect, "is_async", False):
        raise exc.ArgumentError(
            "RequestPool works with synchronous engines only (flask-reqconn's connections"
            " are psycopg.Connection objects)"
        )
    for option in ("json_serializer", "json_deserializer"):
        if getattr(dialect, f"_{option}", None) is not None:
            raise exc.ArgumentError(
                f"{option}: it applies to connections SQLAlchemy opens itself; register it"
                " with psycopg.types.json.set_json_dumps()/set_json_loads() instead"
            )
    if getattr(dialect, "_native_inet_types", None) is False:
        raise exc.ArgumentError(
            "native_inet_types=False: it applies to connections SQLAlchemy opens itself"
        )
    # SQLAlchemy registers psycopg's hstore adapters on the connections it opens; it
    # opens none here, so it must convert hstore values itself.
    dialect.use_native_hstore = False
    if not event.contains(dialect, "handle_error", _on_error):
        event.listen(dialect, "handle_error", _on_error)


def _on_error(context: ExceptionContext) -> None:
    """flask-reqconn's answers to psycopg's errors, which SQLAlchemy wraps in its own.

    A query flask-reqconn cancelled becomes its 499 (or 503), as with ``get_conn()``.
    A lost request connection (:mod:`flask_reqconn.lost`: SQLSTATE class ``08`` or
    ``57P``, or a connection psycopg marked closed) becomes
    :class:`~flask_reqconn.DatabaseUnavailable` (503 with ``Retry-After``), counted and
    logged as with ``get_conn()``; in a streamed body, the WSGI wrapper counts it and
    answers it (503 before the first chunk, a cut after it). SQLAlchemy still
    invalidates the connection; the lease is given back at the end of the request.
    """
    orig = context.original_exception
    if not isinstance(orig, psycopg.OperationalError) or not has_request_context():
        return
    try:
        state = state_of()
    except ReqConnError:
        return
    if isinstance(orig, psycopg.errors.QueryCanceled):
        try:
            replacement = on_query_canceled(state, orig)
        except psycopg.errors.QueryCanceled:
            return  # not a cancellation of flask-reqconn's (statement_timeout...)
        raise replacement from orig
    req = current_leases()
    lease = lost_lease(req, orig)
    if req is None or lease is None:
        return  # not a lost connection: SQLAlchemy's OperationalError, untouched
    raise database_unavailable(state, lease, orig, report=not req.streamed) from orig


def _lease_of(conn: psycopg.Connection[t.Any], name: str | None) -> Lease:
    req = current_leases()
    assert req is not None  # get_conn() made them
    lease: Lease = req.leases[name or req.route]
    assert lease.handle is conn
    return lease


def _closer(
    context: contextvars.Context,
    cm: contextlib.AbstractContextManager[t.Any],
    conn: psycopg.Connection[t.Any],
) -> Callable[[], None]:
    """Give a connection of its own back: roll back (never commit) what is open."""

    def close() -> None:
        try:
            if not conn.closed and conn.pgconn.transaction_status != TransactionStatus.IDLE:
                conn.rollback()
        except Exception as error:  # the hand-back discards a broken connection
            logger.debug("rollback before the hand-back failed: %s", error)
        try:
            context.run(cm.__exit__, None, None, None)
        except Exception as error:
            logger.debug("hand-back of a connection of its own failed: %s", error)

    return close


def engine_options(pool: str | None = None) -> dict[str, t.Any]:
    """Engine options that put an engine on flask-reqconn's connections.

    For ``SQLALCHEMY_ENGINE_OPTIONS`` (Flask-SQLAlchemy), an entry of
    ``SQLALCHEMY_ENGINES`` (Flask-SQLAlchemy-Lite), ``engine_options=`` of either
    extension, or ``sqlalchemy.create_engine(url, **engine_options())``.

    :param pool: the flask-reqconn pool name; ``None`` follows ``get_conn()``.
    """
    options: dict[str, t.Any] = {"poolclass": RequestPool}
    if pool is not None:
        options["reqconn_pool"] = pool
    return options


def create_engine(
    url: str | sa.URL = DEFAULT_URL, *, pool: str | None = None, **kwargs: t.Any
) -> sa.Engine:
    """``sqlalchemy.create_engine`` on flask-reqconn's connections.

    Nothing connects here; the engine is usable in requests and application contexts of
    any app set up with :class:`~flask_reqconn.ReqConn`.

    :param url: selects the dialect; must be ``postgresql+psycopg``. Its host, database
        and credentials are not used.
    :param pool: the flask-reqconn pool name; ``None`` follows ``get_conn()``.
    :param kwargs: further ``create_engine`` arguments (``echo``, ``execution_options``...).
    """
    return sa.create_engine(url, **engine_options(pool), **kwargs)
