"""Pool sizing checks: does a pool fit the worker that uses it, and the server it uses?

Two checks, each one WARNING per process and pool, on a logger of their own that can be
silenced by name:

- :func:`check_concurrency`, at the pool's first checkout in each process (from
  :meth:`flask_reqconn.pool.PoolHolder.checkout`): can the worker run more requests at once
  than its pool holds? The server's concurrency comes from
  :func:`flask_reqconn.probes.concurrency_for` (gunicorn's ``--threads`` or
  ``--worker-connections``, waitress's ``threads``, uWSGI's ``--threads``). A smaller
  pool is a valid choice (it bounds the load on the database).
- :func:`check_server_once`, on the pool's first connection (its ``configure``
  callback, one round trip once per process): can the server's ``max_connections``,
  minus the reserved ones, hold ``MAX_SIZE`` connections of every worker process?
  If not, some workers get none when all are busy and answer 503 "database refusing
  connections" (:mod:`flask_reqconn.attempts`).

:func:`connections_problem` is the arithmetic and the advice of the second check, shared
with ``flask reqconn check --workers N``.
"""

from __future__ import annotations

import logging
import os
import threading
import typing as t

from .names import config_key
from .probes import Concurrency, concurrency_for

if t.TYPE_CHECKING:
    import psycopg

    from .pool import PoolHolder

#: its own documented name: ``logging.getLogger("flask_reqconn.sizing").setLevel(logging.ERROR)``
#: silences the check and nothing else
logger = logging.getLogger("flask_reqconn.sizing")

#: The server's connection limits in one round trip (``reserved_connections`` is PG 16+).
LIMITS_QUERY = (
    "select current_setting('max_connections')::int,"
    " current_setting('superuser_reserved_connections')::int,"
    " coalesce(current_setting('reserved_connections', true), '0')::int"
)
_SILENCE = (
    "Silence this line with logging.getLogger('flask_reqconn.sizing').setLevel(logging.ERROR)"
)
_server_check_lock = threading.Lock()


class ServerLimits(t.NamedTuple):
    """How many connections a PostgreSQL server allows ordinary roles."""

    max_connections: int
    #: ``superuser_reserved_connections`` + ``reserved_connections`` (PG 16+)
    reserved: int

    @property
    def usable(self) -> int:
        return self.max_connections - self.reserved


def server_limits(conn: psycopg.Connection[t.Any]) -> ServerLimits:
    """Read *conn*'s server limits (one round trip; opens a transaction unless autocommit)."""
    row = conn.execute(LIMITS_QUERY).fetchone()
    if row is None:
        raise LookupError("no row from the server settings query")
    max_connections, superuser_reserved, reserved = (int(x) for x in row)
    return ServerLimits(max_connections, superuser_reserved + reserved)


def connections_problem(
    limits: ServerLimits,
    pool_total: int,
    *,
    workers: int,
    others: int = 0,
    key: str = "REQCONN_MAX_SIZE",
) -> str | None:
    """Why *workers* processes with *pool_total* connections each (plus *others*) do not
    fit in the server, or None when they do.

    :param key: the configuration key that sets *pool_total*, named in the advice.
    """
    needed = workers * pool_total + others
    if needed <= limits.usable:
        return None
    plus = f" + {others} others" if others else ""
    return (
        f"{workers} worker{'s' if workers != 1 else ''} x {key} {pool_total}{plus} = {needed}"
        f" exceeds the {limits.usable} connections the server allows (max_connections"
        f" {limits.max_connections} - {limits.reserved} reserved): lower {key} or the"
        " worker count, raise max_connections, or put pgbouncer in front"
    )


def check_concurrency(holder: PoolHolder, environ: t.Mapping[str, t.Any]) -> Concurrency | None:
    """Warn if this worker runs more requests at once than *holder* has connections.

    Called by the pool's first checkout in each process; never raises.

    :returns: what the server says of its concurrency (its worker processes are
        what :func:`check_server_once` counts), None if it says nothing.
    """
    try:
        found = concurrency_for(environ)
    except Exception:  # a server's internals moved: no check rather than a failed request
        return None
    max_size = holder.settings.max_size
    if found is None or found.requests <= max_size:
        return found
    key = config_key(holder.name, "MAX_SIZE")
    logger.warning(
        "pool %s has %s = %d connections, but this worker runs up to %d requests at once"
        " (%s): under full load %d of them wait up to %.1f s for a connection, then get"
        " 503. Fine if intended (it bounds the load on the database); otherwise raise %s"
        " or lower the concurrency. %s",
        holder.log_name,
        key,
        max_size,
        found.requests,
        found.source,
        found.requests - max_size,
        holder.settings.timeout,
        key,
        _SILENCE,
    )
    return found


def check_server_once(holder: PoolHolder, conn: psycopg.Connection[t.Any]) -> None:
    """Warn if the server of *conn* cannot hold *holder*'s ``MAX_SIZE`` in every worker.

    Called with the pool's new connection (its ``configure`` callback): one round trip
    at the first call per pool in each process, nothing later; never raises. Skipped
    behind PgBouncer, whose limits are not the server's. The worker count is the
    server's (gunicorn ``--workers``), else ``$WEB_CONCURRENCY``, else 1.
    """
    pid = os.getpid()
    with _server_check_lock:
        if holder.limits_checked_in == pid:
            return
        holder.limits_checked_in = pid
    settings = holder.settings
    if settings.pgbouncer:
        return
    try:
        autocommit = conn.autocommit
        conn.autocommit = True  # client-side only: no transaction left open
        try:
            limits = server_limits(conn)
        finally:
            conn.autocommit = autocommit
        workers = holder.processes or int(os.environ.get("WEB_CONCURRENCY") or 1)
    except Exception as exc:  # a check, never a failed connection
        logger.debug("could not read the server's connection limits: %s", exc)
        return
    key = config_key(holder.name, "MAX_SIZE")
    problem = connections_problem(limits, settings.max_size, workers=workers, key=key)
    if problem is None:
        return
    logger.warning(
        "pool %s: %s. When all are busy, some workers get no connection and answer 503"
        " 'database refusing connections'; 'flask reqconn check --workers N' adds up all"
        " pools and other clients. %s",
        holder.log_name,
        problem,
        _SILENCE,
    )
