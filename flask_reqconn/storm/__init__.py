"""Abort storm: check that an HTTP app survives clients that hang up mid-request.

The storm runs these steps against one URL of *your* running server (any HTTP/1.1
server, not only one using flask-reqconn):

1. **normal** load: ``normal_count`` GETs, ``normal_concurrency`` at a time;
2. **abort** load: ``abort_count`` requests that the client drops on purpose, mixing the
   styles in :data:`ABORT_STYLES` (send then close at once; close after ``abort_delay``;
   close with a TCP reset; read the first chunk of ``stream_path`` then drop it; send
   half a body then reset);
2b. **stall**, only when a style of :data:`STALL_STYLES` is chosen: ``stall_count``
   clients that send a body slowly, stop sending it, or stop reading a stream, for
   ``stall_seconds``, while probes GET the URL and must keep getting 2xx, and the stats
   oracle must not sit at the pool size;
3. **drain**: a pause for in-flight work, or, with a leak oracle, polling it until nothing
   is checked out (or ``drain_timeout`` passes);
4. **health**: one GET of ``health_path`` (default: the URL) that must answer 2xx within
   ``health_timeout``; if it gets no answer at all, the storm stops here (``early_stop``);
5. **final** load: ``final_count`` GETs that must all answer 2xx.

A leak oracle is optional: ``stats_url`` (a JSON endpoint with an integer
``checked_out``, such as the one flask-reqconn exposes) and/or ``dsn`` +
``application_name`` (sessions of that ``application_name`` in ``pg_stat_activity`` whose
``state`` is not ``'idle'``). With one, the verdict also requires zero after the drain and
again after the final load.

It is a load generator, so it refuses targets that do not resolve to loopback unless told
otherwise, and every phase is bounded in requests and the whole run in time.

Command line::

    python -m flask_reqconn.storm http://127.0.0.1:8000/items --stats-url /reqconn/stats

From Python::

    result = run_storm(StormConfig("http://127.0.0.1:8000/items", abort_count=1000))
    print(format_report(result))
    assert result.ok, result.verdict

The parts: :mod:`~flask_reqconn.storm.config` (options and limits), ``client`` (raw-socket
HTTP and the loopback guard), ``phases`` (the runner and all phases in order), ``stall``
(the stall phase), ``oracles``, ``report`` (verdict, table and the front-end finding),
``cli`` (the click command) and ``__main__``. Import the public names from this package; the modules
are internal.

.. versionadded:: 0.1
"""

from __future__ import annotations

from .cli import main, make_storm_command
from .config import (
    ABORT_STYLES,
    MAX_CONCURRENCY,
    MAX_REQUESTS_PER_PHASE,
    MAX_SECONDS,
    STALL_STYLES,
    StormConfig,
    StormError,
)
from .phases import run_storm
from .report import format_report
from .results import (
    LeakReading,
    PhaseResult,
    Progress,
    ProgressCallback,
    StallResult,
    StormResult,
)

__all__ = [
    "ABORT_STYLES",
    "MAX_CONCURRENCY",
    "MAX_REQUESTS_PER_PHASE",
    "MAX_SECONDS",
    "STALL_STYLES",
    "LeakReading",
    "PhaseResult",
    "Progress",
    "ProgressCallback",
    "StallResult",
    "StormConfig",
    "StormError",
    "StormResult",
    "format_report",
    "main",
    "make_storm_command",
    "run_storm",
]

# Documented (and pickled) under the package's name, not the module that defines them.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith(__name__ + "."):
        _obj.__module__ = __name__
del _name, _obj
