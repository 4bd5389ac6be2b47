"""Bringing a connection back to a clean state before it returns to the pool.

What a request leaves behind must not reach the next one: an open transaction
is rolled back, and session state (``SET``, ``SET ROLE``, ``set_config(...,
false)``, ``LISTEN``, advisory locks, temporary tables, open cursors) is reset,
in one round trip. psycopg's prepared statements survive the rollback of a
transaction that wrote nothing. The statements go to libpq directly: through
``PQexec`` (one wait in C, one result) where psycopg itself waits in C, so the
hand-back does not build a result object per statement. Client-side attributes
a view may have changed (``autocommit``, ``read_only``, ``isolation_level``,
``deferrable``, ``row_factory``) are put back. A connection that is mid-query,
broken or left in pipeline mode is left for the pool to discard.

What each statement costs PostgreSQL is counted by ``bench/backend_instructions.py``
(see the performance page): every statement of a string is planned and run on its
own (8,000 to 14,000 backend instructions for each utility statement, 23,000 for
the simplest ``SELECT``), so the write check is one more column of the ``SELECT``
that releases advisory locks anyway, in its cheapest form.
"""

from __future__ import annotations

import dataclasses
import logging
import typing as t

import psycopg
from psycopg import generators, pq, waiting
from psycopg.pq import DiagnosticField, ExecStatus, PipelineStatus, TransactionStatus

from .lost import is_lost

logger = logging.getLogger("flask_reqconn.handback")

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
    if conn.closed:
        return _DISCARDED
    pgconn = conn.pgconn
    status = pgconn.transaction_status
    if status == _UNKNOWN:
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
            if status == _INTRANS and _is_write_check(conn, last):
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


def _is_write_check(conn: psycopg.Connection[t.Any], result: pq.abc.PGresult) -> bool:
    """Is *result* the write check's failure? (No other statement of the hand-back
    divides, and only the check runs inside the request's transaction.)"""
    return (
        result.status == _FATAL_ERROR
        and result.error_field(DiagnosticField.SQLSTATE) == b"22012"
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
