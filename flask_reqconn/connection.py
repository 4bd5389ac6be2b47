"""The pooled connection: who may use it, whether its server is still there, and how
it comes back clean.

**Who may use it.** The pools of flask-reqconn make :class:`LeasedConnection` objects.
Each knows its owner: the request that holds it (its
:class:`~flask_reqconn.lease.RequestLeases`), a ``reqconn.connection()`` block
(:class:`Block`), or, once given back, the :class:`~flask_reqconn.lease.Lease` that
ended. The code running now says who it is through :data:`current_owner`, a context
variable the request's checkout sets. A statement, a commit or a rollback from anyone
but the owner raises :class:`~flask_reqconn.ConnectionReleased`, whose message the owner
writes (its ``refusal()``): a connection kept past its request never acts inside
another request's transaction.

**Whether its server is still there.** An idle connection whose backend ended
(``pg_terminate_backend``, ``idle_session_timeout``, a restart, a failover, a proxy
restart) still looks fine to psycopg until it is used: its socket, though, is readable
at once and holds a ``FATAL`` ErrorResponse or an EOF. A healthy idle connection has
nothing to read, or only asynchronous messages (a pending ``NOTIFY``, a
ParameterStatus, a notice). :func:`server_gone` tells the two apart without a round
trip and without consuming anything, so psycopg still sees every byte.

**How it comes back clean.** What a request leaves behind must not reach the next one:
an open transaction is rolled back, and session state (``SET``, ``SET ROLE``,
``set_config(..., false)``, ``LISTEN``, advisory locks, temporary tables, open cursors)
is reset, in one round trip (:func:`clean_connection`). psycopg's prepared statements
survive the rollback of a transaction that wrote nothing. The statements go to libpq
directly: through ``PQexec`` (one wait in C, one result) where psycopg itself waits in
C, so the hand-back does not build a result object per statement. Client-side
attributes a view may have changed (``autocommit``, ``read_only``, ``isolation_level``,
``deferrable``, ``row_factory``) are put back. A connection that is mid-query, broken
or left in pipeline mode is left for the pool to discard.

What each statement costs PostgreSQL is counted by ``bench/backend_instructions.py``
(see the performance page): every statement of a string is planned and run on its own
(8,000 to 14,000 backend instructions for each utility statement, 23,000 for the
simplest ``SELECT``), so the write check is one more column of the ``SELECT`` that
releases advisory locks anyway, in its cheapest form.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import logging
import os
import socket
import typing as t
from collections.abc import Iterator

import psycopg
from psycopg import generators, pq, waiting
from psycopg.pq import DiagnosticField, ExecStatus, PipelineStatus, TransactionStatus

from .errors import ConnectionReleased
from .lost import is_lost
from .probes import readable

logger = logging.getLogger(__name__)

# -- who may use it -----------------------------------------------------------------

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


# -- is its server still there ------------------------------------------------------

#: Message types an idle connection may legitimately receive: NotificationResponse,
#: NoticeResponse, ParameterStatus. Anything else (an ErrorResponse) means gone.
_IDLE_MESSAGES = frozenset(b"ANS")
_PEEK = 65536
_CONNECTION_OK = pq.ConnStatus.OK
_GONE_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT})


def server_gone(conn: psycopg.Connection[t.Any]) -> bool:
    """True when the idle *conn* certainly lost its server side. Never raises.

    One ``poll()`` when the socket has nothing to read (the common case); a
    non-consuming peek at what arrived otherwise.
    """
    pgconn = conn.pgconn
    if pgconn.status != _CONNECTION_OK:  # closed, or broken
        return True
    try:
        fd = pgconn.socket
    except psycopg.OperationalError:
        return True
    try:
        if not readable(fd):
            return False
        with socket.socket(fileno=os.dup(fd)) as sock:
            data = sock.recv(_PEEK, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError as exc:
        return exc.errno in _GONE_ERRNOS
    if not data:
        return True  # EOF: the server closed the connection
    return _has_error(data)


def _has_error(data: bytes) -> bool:
    """Does this stream of backend messages say the session ended?

    An ErrorResponse does; so does a notice with an ``57P`` SQLSTATE (operator
    intervention: an immediate shutdown sends its "terminating connection"
    as a WARNING notice before it closes). NOTIFYs, other notices and
    ParameterStatus messages are what a healthy idle connection receives.
    """
    pos = 0
    while pos + 5 <= len(data):
        kind = data[pos]
        end = pos + 1 + int.from_bytes(data[pos + 1 : pos + 5], "big")
        if kind not in _IDLE_MESSAGES:
            return True
        if kind == ord("N") and _sqlstate(data[pos + 5 : end]).startswith(b"57P"):
            return True
        pos = end
    return pos < len(data) and data[pos] not in _IDLE_MESSAGES


def _sqlstate(fields: bytes) -> bytes:
    """The ``C`` field of an ErrorResponse/NoticeResponse body (b"" if not in view)."""
    for field in fields.split(b"\0"):
        if field[:1] == b"C":
            return field[1:]
    return b""


# -- the hand-back ------------------------------------------------------------------

#: The session reset: run after any rollback, in the same round trip. ``SET SESSION
#: AUTHORIZATION DEFAULT`` also ends a ``SET ROLE`` (``RESET ALL`` leaves the role
#: alone); startup settings (``REQCONN_SESSION_SETTINGS``, ``application_name``)
#: survive, since ``RESET ALL`` restores them. Session-level advisory locks are
#: released by ``pg_advisory_unlock_all()`` in the hand-back's ``SELECT``.
RESET_SESSION_SQL = (
    "SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; CLOSE ALL;"
    " DISCARD TEMP; DISCARD SEQUENCES"
)
#: Seconds to wait for a cancel request when a connection comes back mid-query.
HANDBACK_CANCEL_TIMEOUT = 5.0
#: The write check: it fails (division by zero) only if the open transaction has an
#: ID, that is, if it wrote; ``NULL`` otherwise. PostgreSQL logs the failure with
#: the statement, whose comment says what it means. Besides the WARNING, the answer
#: tells whether psycopg's prepared statements may depend on a catalog change that
#: the rollback undid.
_WRITE_CHECK = (
    "/* flask-reqconn hand-back: fails if the request left uncommitted writes */"
    " SELECT txid_current_if_assigned() / 0"
)
_UNLOCK = "pg_advisory_unlock_all()"
#: psycopg's statuses, read once: on Python 3.11 reading an enum member through its
#: class costs about as much as a function call, and the hand-back reads ten.
_IDLE, _INTRANS = TransactionStatus.IDLE, TransactionStatus.INTRANS
_INERROR, _ACTIVE = TransactionStatus.INERROR, TransactionStatus.ACTIVE
_UNKNOWN, _PIPELINE_OFF = TransactionStatus.UNKNOWN, PipelineStatus.OFF
_COMMAND_OK, _TUPLES_OK = ExecStatus.COMMAND_OK, ExecStatus.TUPLES_OK
_FATAL_ERROR = ExecStatus.FATAL_ERROR
#: The hand-back's SQL by (transaction status, reset the session): one string each,
#: one round trip. A write check that fails stops the string there: the transaction
#: is then in error, and the hand-back of a failed transaction follows.
_SQL: dict[tuple[int, bool], bytes] = {
    (_INTRANS, True): (
        f"{_WRITE_CHECK}, {_UNLOCK}; ROLLBACK; {RESET_SESSION_SQL}".encode()
    ),
    (_INTRANS, False): f"{_WRITE_CHECK}; ROLLBACK".encode(),
    (_INERROR, True): f"ROLLBACK; SELECT {_UNLOCK}; {RESET_SESSION_SQL}".encode(),
    (_INERROR, False): b"ROLLBACK",
    (_IDLE, True): f"SELECT {_UNLOCK}; {RESET_SESSION_SQL}".encode(),
}


@dataclasses.dataclass(frozen=True)
class Baseline:
    """The client-side connection attributes every request starts with."""

    autocommit: bool
    row_factory: t.Any


@dataclasses.dataclass(frozen=True)
class CleanOutcome:
    """What cleaning a connection found and did (returned by :func:`clean_connection`)."""

    rolled_back: bool = False
    discarded_writes: bool = False
    #: the connection is unusable and was closed; the pool will replace it.
    discarded: bool = False
    error: str = ""
    #: what made cleaning fail, if anything
    exception: BaseException | None = None
    #: that failure says the connection's server side is gone (:func:`~flask_reqconn.lost.is_lost`)
    lost: bool = False


#: The usual outcomes, made once (the hand-back of every request returns one).
_CLEAN = CleanOutcome()
_ROLLED_BACK = CleanOutcome(rolled_back=True)
_ROLLED_BACK_WRITES = CleanOutcome(rolled_back=True, discarded_writes=True)
_DISCARDED = CleanOutcome(discarded=True)


def clean_connection(
    conn: psycopg.Connection[t.Any], baseline: Baseline, *, reset_session: bool
) -> CleanOutcome:
    """Roll back, reset session state and restore attributes. Never raises.

    A connection that is closed, broken, or in the middle of a query is left
    as it is: ``putconn`` discards such connections.
    """
    pgconn = conn.pgconn
    status = pgconn.transaction_status
    if status == _UNKNOWN:  # closed, or broken
        return _DISCARDED
    if status == _ACTIVE:
        # Returned mid-query (an abandoned stream, a raw send_query): stop the
        # statement on the server, which would otherwise run to its end, and
        # discard the connection.
        _cancel_and_close(conn)
        return CleanOutcome(discarded=True, error="returned while a query was still running")
    outcome = _CLEAN
    try:
        if status != _IDLE or reset_session:
            if pgconn.pipeline_status != _PIPELINE_OFF:
                raise psycopg.InterfaceError("returned in pipeline mode")
            last = _run(conn, _SQL[status, reset_session])
            if status != _IDLE:
                outcome = _ROLLED_BACK
            if status == _INTRANS and last.status == _FATAL_ERROR and _is_write_check(conn, last):
                # the transaction wrote; the check failed, so it is in error now
                outcome = _ROLLED_BACK_WRITES
                status = _INERROR
                last = _run(conn, _SQL[status, reset_session])
            if last.status not in (_COMMAND_OK, _TUPLES_OK):
                _raise_for(conn, last)
            if status == _INERROR:
                _forget_prepared(conn)  # as psycopg does when it sees a ROLLBACK
        if pgconn.transaction_status != _IDLE:
            raise psycopg.InterfaceError("connection not idle after reset")
        restore_attributes(conn, baseline)
    except Exception as exc:
        failed = CleanOutcome(
            rolled_back=outcome.rolled_back,
            discarded_writes=outcome.discarded_writes,
            discarded=True,
            error=f"{type(exc).__name__}: {exc}",
            exception=exc,
            lost=is_lost(exc, conn),  # before the close: it looks at the connection
        )
        try:
            conn.close()
        except Exception:  # pragma: no cover - close() does not raise in practice
            pass
        return failed
    return outcome


def _is_write_check(conn: psycopg.Connection[t.Any], failed: pq.abc.PGresult) -> bool:
    """Is *failed* (a result with status ``FATAL_ERROR``) the write check's failure?
    (No other statement of the hand-back divides, and only the check runs inside the
    request's transaction.)"""
    return (
        failed.error_field(DiagnosticField.SQLSTATE) == b"22012"
        and conn.pgconn.transaction_status == _INERROR
    )


def _run(conn: psycopg.Connection[t.Any], sql: bytes) -> pq.abc.PGresult:
    """Run *sql* (one or more statements) on libpq; the last statement's result.

    Under the connection's lock, as psycopg's own ``commit()``. Where psycopg waits
    in C itself, through ``PQexec``: one wait and one result, however many
    statements (libpq stops at the first that fails and returns its error).
    Elsewhere (gevent) through psycopg's own wait, which lets other greenlets run.
    Notifications that came meanwhile go to psycopg's handlers, as its own
    ``execute()`` would send them.
    """
    pgconn = conn.pgconn
    with conn.lock:
        if waiting.wait is _WAIT_C and _WAIT_C is not None:
            last: pq.abc.PGresult | None = pgconn.exec_(sql)
        else:
            pgconn.send_query(sql)
            results = conn.wait(generators.execute(pgconn))
            last = results[-1] if results else None
        notify = pgconn.notify_handler
        while (pending := pgconn.notifies()) is not None:
            if notify is not None:
                notify(pending)
    if last is None:  # pragma: no cover - libpq returns a result for every query
        raise psycopg.InterfaceError("the hand-back got no result")
    return last


#: psycopg's wait in C (None without the C extension): where psycopg uses it (no
#: gevent patching, no ``PSYCOPG_WAIT_FUNC``), a wait in C is fine for the hand-back too
_WAIT_C = getattr(waiting, "wait_c", None)


def _raise_for(conn: psycopg.Connection[t.Any], result: pq.abc.PGresult) -> t.NoReturn:
    if conn.pgconn.status == pq.ConnStatus.BAD:
        # what psycopg raises when libpq loses the connection mid-statement (the
        # result has no SQLSTATE: error_from_result would make it a DatabaseError)
        raise psycopg.OperationalError(
            f"the connection was lost during the hand-back: {pq.error_message(conn.pgconn)}"
        )
    if result.status == _FATAL_ERROR:
        raise psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
    raise psycopg.InterfaceError(f"unexpected result of the hand-back: {result.status}")


def _forget_prepared(conn: psycopg.Connection[t.Any]) -> None:
    """Make psycopg drop its prepared statements (``DEALLOCATE ALL`` before its next query).

    What psycopg's ``rollback()`` does; without that internal (another
    psycopg), the connection is closed instead and the pool replaces it.
    """
    clear = getattr(getattr(conn, "_prepared", None), "clear", None)
    if not callable(clear):  # pragma: no cover - psycopg without PrepareManager.clear
        raise psycopg.InterfaceError("cannot clear psycopg's prepared statements")
    clear()


def make_read_only(conn: psycopg.Connection[t.Any] | None) -> None:
    """Make *conn* refuse writes until it is handed back (and reset).

    Autocommit connections leave autocommit: every statement then runs in a
    ``READ ONLY`` transaction, rolled back at hand-back, where autocommit is
    restored. A session-level ``SET`` would outlive the transaction on the
    wrong server connection behind pgbouncer.
    """
    if conn is None or conn.pgconn.transaction_status != _IDLE:
        return
    if conn.autocommit:
        conn.autocommit = False
    conn.read_only = True


def _cancel_and_close(conn: psycopg.Connection[t.Any]) -> None:
    try:
        if hasattr(conn, "cancel_safe"):
            conn.cancel_safe(timeout=HANDBACK_CANCEL_TIMEOUT)
        else:  # pragma: no cover - psycopg < 3.2
            conn.cancel()
    except Exception as exc:
        logger.debug("could not cancel the running query: %s", exc)
    conn.close()


def restore_attributes(conn: psycopg.Connection[t.Any], baseline: Baseline) -> None:
    if conn.autocommit is not baseline.autocommit:
        conn.autocommit = baseline.autocommit
    if conn.read_only is not None:
        conn.read_only = None
    if conn.isolation_level is not None:
        conn.isolation_level = None
    if conn.deferrable is not None:
        conn.deferrable = None
    if conn.row_factory is not baseline.row_factory:
        conn.row_factory = baseline.row_factory
