"""What the server modules share besides probing: a worker process's concurrency.

How many requests a server's worker process runs at once (:class:`Concurrency`), read by
each server module's ``concurrency(environ)`` from the worker or task object serving the
request, which :func:`caller_self` finds. Used once per process, by the pool sizing check
(:mod:`flask_reqconn.sizing`), never per request. A module of its own because the server
modules need it and :mod:`flask_reqconn.probes` imports them.
"""

from __future__ import annotations

import sys
import typing as t


class Concurrency(t.NamedTuple):
    """How many requests one worker process of a server runs at once, and why."""

    #: requests at the same time in this process
    requests: int
    #: where the number comes from, as the user set it (``gunicorn gthread --threads 8``)
    source: str
    #: worker processes of the server, each with its own pools (None: unknown)
    processes: int | None = None


def caller_self(cls: type) -> t.Any | None:
    """The ``self`` of the nearest frame up this thread's stack that is a *cls* method.

    How a server's worker or task object is found from inside the app: meant to run
    once per process (it reads every frame's locals), never per request.
    """
    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, cls):
            return obj
        frame = frame.f_back  # type: ignore[assignment]
    return None
