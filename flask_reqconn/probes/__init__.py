"""Client probes: is this request's HTTP client still there?

Used right before and right after waiting for a pool connection, and by the
watcher while a query runs. What each WSGI server offers differs, so each
server family has a module here with the same two functions:

- ``probe(environ)``: a :class:`~flask_reqconn.probes.base.ClientProbe` for a
  request of that server, or None if the environ is not that server's;
- ``is_file_wrapper(body)``: is this response body the server's
  ``wsgi.file_wrapper`` (a file, which cannot run queries)?

and, optionally, ``concurrency(environ)``: how many requests a worker process
runs at once (a :class:`~flask_reqconn.probes.base.Concurrency`), for the pool
sizing check (:mod:`flask_reqconn.sizing`).

Supporting one more server (uWSGI, Granian...) is one more module listed in
:data:`SERVERS`.
"""

from __future__ import annotations

import typing as t

from . import gunicorn, uwsgi, waitress, werkzeug
from .base import (
    CLIENT_ABORT_ERRORS,
    NO_PROBE,
    ClientProbe,
    Concurrency,
    NoProbe,
    is_client_abort,
)
from .peek import SocketProbe, socket_gone


class Server(t.Protocol):
    """What a server module of this package offers (a module, used as an object)."""

    def probe(self, environ: t.Mapping[str, t.Any]) -> ClientProbe | None: ...

    def is_file_wrapper(self, body: t.Any) -> bool: ...


#: The server modules, tried in this order.
SERVERS: tuple[Server, ...] = (gunicorn, werkzeug, uwsgi, waitress)


def probe_for(environ: t.Mapping[str, t.Any]) -> ClientProbe:
    """The probe of the request of *environ*: the first server module's that knows it."""
    for server in SERVERS:
        probe = server.probe(environ)
        if probe is not None:
            return probe
    return NO_PROBE


def concurrency_for(environ: t.Mapping[str, t.Any]) -> Concurrency | None:
    """How many requests this worker process runs at once, from the first server module
    that knows (None: unknown, e.g. the werkzeug dev server, which has no bound)."""
    for server in SERVERS:
        concurrency = getattr(server, "concurrency", None)
        found = concurrency(environ) if concurrency is not None else None
        if found is not None:
            return t.cast(Concurrency, found)
    return None


def is_file_wrapper(body: t.Any) -> bool:
    """Is *body* a server's ``wsgi.file_wrapper`` (or werkzeug's ``FileWrapper``)?"""
    return any(server.is_file_wrapper(body) for server in SERVERS)


__all__ = [
    "CLIENT_ABORT_ERRORS",
    "NO_PROBE",
    "SERVERS",
    "ClientProbe",
    "Concurrency",
    "NoProbe",
    "Server",
    "SocketProbe",
    "concurrency_for",
    "is_client_abort",
    "is_file_wrapper",
    "probe_for",
    "socket_gone",
]
