"""A pool's connection attempts: does the database refuse them, why, since when.

When a pool cannot open connections (the server's ``max_connections`` is reached:
"too many clients", "remaining connection slots are reserved"; a failed login; an
unknown database; a closed port; an unknown host), psycopg_pool logs a WARNING for
every attempt (``error connecting in 'pool': ...``) and tries again, every half
second with :class:`~flask_reqconn.pool.RequestPool`: hundreds of lines a minute
per worker, while requests waiting for the pool looked exhausted.

:class:`ConnectAttempts` keeps the state of one opened pool: the cause of its last
failed attempt and whether an attempt succeeded since. The pool's connection attempts
report to it (:func:`observe`, used by ``RequestPool``). psycopg_pool's per-attempt
line for those attempts is taken over by a filter on the ``psycopg.pool`` logger
(re-logged here at DEBUG) and reported instead as one WARNING when the refusals
start, one a minute while they last, and an INFO line when the database accepts
connections again. A request that then times out waiting for the pool is answered
:class:`~flask_reqconn.DatabaseRefused` while :meth:`ConnectAttempts.refusing` says
why (:mod:`flask_reqconn.exhaustion`, only after the timeout, never on the way to
a connection)."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
import typing as t
from collections.abc import Iterator, Mapping

from .names import config_key
from .redact import scrub_conninfo_error

if t.TYPE_CHECKING:
    from .config import PoolSettings

logger = logging.getLogger(__name__)

#: Seconds between two WARNINGs of one pool's refusals (unless the cause changes).
REPORT_EVERY = 60.0
#: A failed attempt older than this many seconds (plus the pool's timeout) with
#: none since no longer explains a timeout: the pool stopped trying.
RECENT = 10.0
#: The longest cause kept (libpq's message, first line).
_MAX_CAUSE = 300
_SPACES = re.compile(r"\s+")

#: The cause of a failed attempt whose error psycopg_pool could not log.
UNKNOWN_CAUSE = (
    "connection attempt failed (its error is only seen when the psycopg.pool logger is"
    " enabled for WARNING)"
)


class _Attempt(threading.local):
    active = False
    error: BaseException | None = None


_attempt = _Attempt()
_install_lock = threading.Lock()


class AttemptFilter(logging.Filter):
    """Takes psycopg_pool's WARNING for a failed attempt of a ``RequestPool``.

    Only a record logged in the thread of such an attempt, while it runs, and
    carrying the exception: psycopg_pool's other lines, and every line of other
    pools, pass untouched.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not _attempt.active or record.levelno != logging.WARNING:
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        error = next((arg for arg in args if isinstance(arg, BaseException)), None)
        if error is None:
            return True
        _attempt.error = error
        return False


def install_filter() -> None:
    """Add :class:`AttemptFilter` to the ``psycopg.pool`` logger, once per process."""
    target = logging.getLogger("psycopg.pool")
    with _install_lock:
        if not any(isinstance(f, AttemptFilter) for f in target.filters):
            target.addFilter(AttemptFilter())


class Outcome:
    """What one connection attempt ended with: ``error`` is None when it succeeded."""

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: BaseException | None = None


@contextlib.contextmanager
def observe() -> Iterator[Outcome]:
    """Run one connection attempt of a ``RequestPool`` in this block.

    psycopg_pool's WARNING for its failure is not logged; its exception is in
    the outcome once the block ends.
    """
    outcome = Outcome()
    _attempt.active, _attempt.error = True, None
    try:
        yield outcome
    finally:
        outcome.error = _attempt.error
        _attempt.active, _attempt.error = False, None


def describe(
    error: BaseException | None, conninfo: str = "", connect_args: Mapping[str, t.Any] | None = None
) -> str:
    """The cause of a failed connection attempt in one line, without passwords.

    libpq's first line (``connection to server at "db", port 5432 failed: FATAL:
    sorry, too many clients already``), without psycopg's ``connection failed:``;
    nothing of a password of *conninfo* or *connect_args* in it.
    """
    if error is None:
        return UNKNOWN_CAUSE
    text = scrub_conninfo_error(str(error), conninfo, connect_args).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    line = _SPACES.sub(" ", line.removeprefix("connection failed: ")).strip()
    return line[:_MAX_CAUSE]


def advice(cause: str, *, max_size_key: str, conninfo_key: str) -> str:
    """What to do about *cause*, naming the key to change."""
    lowered = cause.lower()
    if "too many" in lowered or "connection slots are reserved" in lowered:
        return (
            f"the server's connection limit is reached: lower {max_size_key} or the worker"
            " count, raise max_connections (or the role's or database's CONNECTION LIMIT),"
            " or put PgBouncer in front; 'flask reqconn check --workers N' adds it up"
        )
    if "authentication" in lowered or "does not exist" in lowered or "pg_hba" in lowered:
        return f"check the user, password and database name of {conninfo_key}"
    return f"check that the server is up and reachable at the host and port of {conninfo_key}"


class ConnectAttempts:
    """The connection attempts of one opened pool, and its reports of refusals.

    Thread-safe: attempts report from the pool's worker threads, requests ask
    from theirs.

    :param log_name: the pool's name in messages (``'default' (reqconn:app)``).
    :param timeout: the pool's ``REQCONN_TIMEOUT``.
    :param max_size_key: the key that sets the pool's ``MAX_SIZE``, for advice.
    :param conninfo_key: the key that sets its ``CONNINFO``, for advice.
    :param conninfo: the pool's conninfo, whose passwords stay out of messages.
    :param connect_args: its connection arguments, likewise.
    """

    def __init__(
        self,
        log_name: str,
        *,
        timeout: float,
        max_size_key: str = "REQCONN_MAX_SIZE",
        conninfo_key: str = "REQCONN_CONNINFO",
        conninfo: str = "",
        connect_args: Mapping[str, t.Any] | None = None,
    ) -> None:
        self.log_name = log_name
        self.timeout = timeout
        self.max_size_key = max_size_key
        self.conninfo_key = conninfo_key
        self._conninfo, self._connect_args = conninfo, dict(connect_args or {})
        self._lock = threading.Lock()
        #: the cause of the last failed attempt, and when (monotonic)
        self.last_cause = ""
        self.failed_at: float | None = None
        #: when the last attempt succeeded
        self.succeeded_at: float | None = None
        #: when the current run of failed attempts began (None: the last attempt worked)
        self.since: float | None = None
        self._burst_failures = 0
        self._burst_answered = 0
        self._reported_at: float | None = None
        self._reported_cause = ""
        self._unreported_failures = 0
        self._unreported_answered = 0

    @classmethod
    def for_pool(cls, name: str, log_name: str, settings: PoolSettings) -> ConnectAttempts:
        """The attempts of the pool *name*, reported with its keys and without its
        passwords; installs the filter on ``psycopg.pool``."""
        install_filter()
        return cls(
            log_name,
            timeout=settings.timeout,
            max_size_key=config_key(name, "MAX_SIZE"),
            conninfo_key=config_key(name, "CONNINFO"),
            conninfo=settings.conninfo,
            connect_args=settings.connect_args,
        )

    def __repr__(self) -> str:
        return f"<ConnectAttempts {self.log_name!r} refused since={self.since}>"

    def failed(self, error: BaseException | None) -> None:
        """An attempt failed with *error* (None: unknown): WARNING if a report is due,
        else counted."""
        now = time.monotonic()
        cause = describe(error, self._conninfo, self._connect_args)
        logger.debug("connection attempt of pool %s failed: %s", self.log_name, cause)
        with self._lock:
            self.last_cause, self.failed_at = cause, now
            started = self.since is None
            if started:
                self.since = now
                self._burst_failures = self._burst_answered = 0
            self._burst_failures += 1
            self._unreported_failures += 1
            last = self._reported_at
            due = (
                last is None
                or now - last >= REPORT_EVERY
                or (cause != self._reported_cause and now - last >= 1.0)
            )
            if not due:
                return
            failures, answered = self._unreported_failures, self._unreported_answered
            self._unreported_failures = self._unreported_answered = 0
            self._reported_at, self._reported_cause = now, cause
            lasting = now - self.since if self.since is not None else 0.0
        what = advice(cause, max_size_key=self.max_size_key, conninfo_key=self.conninfo_key)
        if started:
            logger.warning(
                "pool %s cannot open connections: database refusing connections: %s."
                " Requests that find no free connection within %.1f s are answered 503"
                " (counted in 'refused'); one line a minute while it lasts. To fix: %s",
                self.log_name,
                cause,
                self.timeout,
                what,
            )
        else:
            logger.warning(
                "pool %s: database still refusing connections after %.0f s: %s (%d failed"
                " attempts and %d requests answered 503 since the last report). To fix: %s",
                self.log_name,
                lasting,
                cause,
                failures,
                answered,
                what,
            )

    def succeeded(self) -> None:
        """An attempt opened a connection: a run of refusals, if any, is over."""
        now = time.monotonic()
        with self._lock:
            self.succeeded_at = now
            since, self.since = self.since, None
            if since is None:
                return
            failures, answered = self._burst_failures, self._burst_answered
        logger.info(
            "pool %s: the database accepts connections again after %.1f s of refusals"
            " (%d failed attempts, %d requests answered 503)",
            self.log_name,
            now - since,
            failures,
            answered,
        )

    def refusing(self) -> str | None:
        """Why the database refuses this pool's connections right now, or None.

        Refusing: the pool's last attempt failed, recently. A pool whose
        connections are all busy makes no attempt, so its timeouts stay
        exhaustion.
        """
        failed_at = self.failed_at
        if failed_at is None or self.since is None:
            return None
        if time.monotonic() - failed_at > self.timeout + RECENT:
            return None
        return self.last_cause

    def answered(self) -> None:
        """A request was answered 503 for the refusals (counted in the next report)."""
        with self._lock:
            self._burst_answered += 1
            self._unreported_answered += 1
