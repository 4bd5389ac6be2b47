"""Is the HTTP client of this request still there? (The old import path.)

The probes now live in :mod:`flask_reqconn.probes`, one module per server
family; the names below stay importable from here.
"""

from __future__ import annotations

import _socket
import typing as t

from .probes import CLIENT_ABORT_ERRORS, ClientProbe, is_client_abort, probe_for, socket_gone
from .probes import gunicorn as _gunicorn
from .probes import werkzeug as _werkzeug
from .probes.peek import SocketProbe


def client_socket(environ: t.Mapping[str, t.Any]) -> _socket.socket | None:
    """The client's socket, if the server exposes one that can be peeked."""
    probe = _gunicorn.probe(environ) or _werkzeug.probe(environ)
    return probe.sock if isinstance(probe, SocketProbe) else None


def client_gone(environ: t.Mapping[str, t.Any], *, eof_means_gone: bool = True) -> bool:
    """Return True only when the request's client has certainly disconnected.

    Never blocks, never consumes request data, never raises. False means
    "present or unknown".
    """
    return probe_for(environ).gone(eof_means_gone)


__all__ = [
    "CLIENT_ABORT_ERRORS",
    "ClientProbe",
    "client_gone",
    "client_socket",
    "is_client_abort",
    "socket_gone",
]
