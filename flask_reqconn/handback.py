"""Bringing a connection back to a clean state before it returns to the pool.

What a request leaves behind must not reach the next one: an open transaction
is rolled back, and session state (``SET``, ``SET ROLE``, ``set_config(...,
false)``, ``LISTEN``, advisory locks, temporary tables, open cursors) is reset,
in one round trip. psycopg's prepared statements survive the rollback of a
transaction that wrote nothing. The statements go to libpq directly: through
``PQexec`` (one wait in C, one result) where psycopg itself waits in C, so the
hand-back does not build a result object per statement. Client-side attributes
a view may have changed (``autocommit``, ``read_only``, ``isolation_level``,
``deferrable``, ``row_factory``) are put back. A connection that is mid-query or
broken is left for the pool to discard.
"""

from __future__ import annotations

import dataclasses
import logging
import typing as t

import psycopg
from psycopg import generators, pq, waiting
from psycopg.pq import DiagnosticField, ExecStatus, TransactionStatus
from psycopg.rows import tuple_row

from .lost import is_lost

logger = logging.getLogger("flask_reqconn.handback")

#: Statements that undo session state; run after any rollback, in the same
#: round trip. Startup settings (``REQCONN_SESSION_SETTINGS``,
#: ``application_name``) survive, since ``RESET ALL`` restores them.
RESET_SESSION_SQL = (
    "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *;"
    " SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES"
)
#: Seconds to wait for a cancel request when a connection comes back mid-query.
HANDBACK_CANCEL_TIMEOUT = 5.0
#: What the write check's error says: it stops the hand-back of a transaction that
#: wrote (an xid was assigned) before its ``ROLLBACK``. PostgreSQL logs it as
#: ``invalid input syntax for type integer: "flask-reqconn: uncommitted writes
#: rolled back, transaction 1234"``.
WRITE_CHECK_MARKER = "flask-reqconn: uncommitted writes rolled back, transaction "
#: The hand-back of an open transaction. Only the last statement's result comes
#: back (``PQexec``), so the write check answers by failing: a transaction that
#: wrote nothing runs to the end (rolled back, and reset); one that wrote stops at
#: the check, and is rolled back (and reset) by a second statement. The advisory
#: locks are released in the check, before the rollback (session-level advisory
#: locks are not transactional).
#: The comment leads, so that ``pg_stat_activity.query`` of an idle connection (the
#: last statement it ran) does not read as if every request had left writes.
_WRITE_CHECK = (
    "/* flask-reqconn hand-back: fails only if the request left uncommitted writes */"
    f" SELECT ('{WRITE_CHECK_MARKER}' || txid_current_if_assigned())::int"
)
_ROLLBACK_CHECKING_WRITES = f"{_WRITE_CHECK}; ROLLBACK"
_ROLLBACK_CHECKING_WRITES_AND_RESET = (
    f"{_WRITE_CHECK}, pg_advisory_unlock_all(); ROLLBACK;"
    " CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *;"
    " DISCARD TEMP; DISCARD SEQUENCES"
)
_ROLLBACK_CHECKING_WRITES_BYTES = _ROLLBACK_CHECKING_WRITES.encode()
_ROLLBACK_CHECKING_WRITES_AND_RESET_BYTES = _ROLLBACK_CHECKING_WRITES_AND_RESET.encode()
_RESET_SESSION_BYTES = RESET_SESSION_SQL.encode()
_ROLLBACK_AND_RESET_BYTES = f"ROLLBACK; {RESET_SESSION_SQL}".encode()
_WRITE_CHECK_MARKER_BYTES = WRITE_CHECK_MARKER.encode()


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
    status = conn.pgconn.transaction_status
    if status == TransactionStatus.UNKNOWN:
        return _DISCARDED
    if status == TransactionStatus.ACTIVE:
        # Returned mid-query (an abandoned stream, a raw send_query): stop the
        # statement on the server, which would otherwise run to its end, and
        # discard the connection.
        _cancel_and_close(conn)
        return CleanOutcome(discarded=True, error="returned while a query was still running")
    outcome = _CLEAN
    try:
        if status == TransactionStatus.INTRANS:
            wrote = _rollback_checking_writes(conn, reset_session)
            outcome = _ROLLED_BACK_WRITES if wrote else _ROLLED_BACK
        elif status == TransactionStatus.INERROR:
            _run_ok(conn, _ROLLBACK_AND_RESET_BYTES if reset_session else b"ROLLBACK")
            _forget_prepared(conn)  # as psycopg does when it sees a ROLLBACK
            outcome = _ROLLED_BACK
        elif reset_session:
            # libpq runs the statements as they are: no BEGIN (psycopg's autocommit
            # matters to psycopg's own execute() only)
            _run_ok(conn, _RESET_SESSION_BYTES)
        if conn.pgconn.transaction_status != TransactionStatus.IDLE:
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


def _rollback_checking_writes(conn: psycopg.Connection[t.Any], reset_session: bool) -> bool:
    """Roll back the open transaction (and reset the session); return True if it wrote.

    psycopg forgets its prepared statements whenever it sees a ``ROLLBACK``,
    in case the rollback dropped an object they use. A transaction without an
    xid changed no catalog, so for it the statements stay prepared, as after the
    bare pool's ``COMMIT``: the statements go to libpq directly (:func:`_run`), so
    psycopg's prepared-statement bookkeeping never sees them, and no cursor is
    made. When the transaction wrote, psycopg's cache is cleared as its own
    ``rollback()`` would.
    """
    if conn.pgconn.pipeline_status != pq.PipelineStatus.OFF:  # pragma: no cover - left open
        return _rollback_checking_writes_by_cursor(conn, reset_session)
    last = _run(
        conn,
        _ROLLBACK_CHECKING_WRITES_AND_RESET_BYTES
        if reset_session
        else _ROLLBACK_CHECKING_WRITES_BYTES,
    )
    if last.status == ExecStatus.COMMAND_OK:
        return False
    if last.status != ExecStatus.FATAL_ERROR or not _is_write_check(last):
        _raise_for(conn, last)
    # the check stopped the statements: the transaction wrote, and failed there
    _run_ok(conn, _ROLLBACK_AND_RESET_BYTES if reset_session else b"ROLLBACK")
    _forget_prepared(conn)
    return True


def _is_write_check(result: pq.abc.PGresult) -> bool:
    """Is *result* the write check's own error (an xid was assigned)?"""
    return result.error_field(DiagnosticField.SQLSTATE) == b"22P02" and (
        _WRITE_CHECK_MARKER_BYTES in (result.error_field(DiagnosticField.MESSAGE_PRIMARY) or b"")
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


def _run_ok(conn: psycopg.Connection[t.Any], sql: bytes) -> None:
    """:func:`_run` *sql*; raise psycopg's error if a statement failed."""
    last = _run(conn, sql)
    if last.status not in (ExecStatus.COMMAND_OK, ExecStatus.TUPLES_OK):
        _raise_for(conn, last)


def _raise_for(conn: psycopg.Connection[t.Any], result: pq.abc.PGresult) -> t.NoReturn:
    if conn.pgconn.status == pq.ConnStatus.BAD:
        # what psycopg raises when libpq loses the connection mid-statement (the
        # result has no SQLSTATE: error_from_result would make it a DatabaseError)
        raise psycopg.OperationalError(
            f"the connection was lost during the hand-back: {pq.error_message(conn.pgconn)}"
        )
    if result.status == ExecStatus.FATAL_ERROR:
        raise psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
    raise psycopg.InterfaceError(f"unexpected result of the hand-back: {result.status}")


#: psycopg's wait in C (None without the C extension): where psycopg uses it (no
#: gevent patching, no ``PSYCOPG_WAIT_FUNC``), a wait in C is fine for the hand-back too
_WAIT_C = getattr(waiting, "wait_c", None)


def _rollback_checking_writes_by_cursor(
    conn: psycopg.Connection[t.Any], reset_session: bool
) -> bool:
    """:func:`_rollback_checking_writes` through a cursor (a connection in pipeline mode)."""
    threshold = conn.prepare_threshold
    conn.prepare_threshold = None
    try:
        # tuple rows whatever row factory the app set (dict_row...)
        with conn.cursor(row_factory=tuple_row) as cur:
            try:
                cur.execute(
                    _ROLLBACK_CHECKING_WRITES_AND_RESET
                    if reset_session
                    else _ROLLBACK_CHECKING_WRITES
                )
            except psycopg.errors.InvalidTextRepresentation as exc:
                if WRITE_CHECK_MARKER not in str(exc):
                    raise
                cur.execute(f"ROLLBACK; {RESET_SESSION_SQL}" if reset_session else "ROLLBACK")
                _forget_prepared(conn)
                return True
    finally:
        conn.prepare_threshold = threshold
    return False


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
    if conn is None or conn.pgconn.transaction_status != TransactionStatus.IDLE:
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
