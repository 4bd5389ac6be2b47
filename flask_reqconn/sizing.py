"""The pool sizing check: can a worker run more requests at once than its pool holds?

Run once per process and pool, at its first checkout, from
:func:`flask_reqconn.checkout.checkout`. The server's concurrency comes from
:func:`flask_reqconn.probes.concurrency_for` (gunicorn's ``--threads`` or
``--worker-connections``, waitress's ``threads``, uWSGI's ``--threads``).
A smaller pool is a valid choice (it bounds the load on the database), so this
is one WARNING, on a logger of its own that can be silenced by name.
"""

from __future__ import annotations

import logging
import os
import typing as t

from .names import DEFAULT_POOL
from .probes import concurrency_for

if t.TYPE_CHECKING:
    from .pool import PoolHolder

#: its own documented name: ``logging.getLogger("flask_reqconn.sizing").setLevel(logging.ERROR)``
#: silences the check and nothing else
logger = logging.getLogger("flask_reqconn.sizing")

def check_once(holder: PoolHolder, environ: t.Mapping[str, t.Any]) -> None:
    """Warn if this worker runs more requests at once than *holder* has connections.

    Does something at the first call per pool in each process; never raises.
    """
    pid = os.getpid()
    if holder.size_checked_in == pid:  # a forked child checks again
        return
    holder.size_checked_in = pid
    try:
        found = concurrency_for(environ)
    except Exception:  # a server's internals moved: no check rather than a failed request
        return
    max_size = holder.settings.max_size
    if found is None or found.requests <= max_size:
        return
    key = (
        "REQCONN_MAX_SIZE"
        if holder.name == DEFAULT_POOL
        else f"REQCONN_POOLS[{holder.name!r}]['MAX_SIZE']"
    )
    logger.warning(
        "pool %s has %s = %d connections, but this worker runs up to %d requests at once"
        " (%s): under full load %d of them wait up to %.1f s for a connection, then get"
        " 503. Fine if intended (it bounds the load on the database); otherwise raise %s"
        " or lower the concurrency. Silence this line with"
        " logging.getLogger('flask_reqconn.sizing').setLevel(logging.ERROR)",
        holder.log_name,
        key,
        max_size,
        found.requests,
        found.source,
        found.requests - max_size,
        holder.settings.timeout,
        key,
    )
