"""gunicorn: sync, gthread and gevent workers, and ``gevent_pywsgi``.

The client socket is ``environ["gunicorn.socket"]`` (``"gunicorn.sock"``
under ``gevent_pywsgi``), peeked by :class:`~flask_reqconn.probes.peek.SocketProbe`;
gunicorn's own TLS sockets cannot be peeked. Its ``wsgi.file_wrapper`` keeps
the file as ``.filelike``.
"""

from __future__ import annotations

import typing as t

from .base import ClientProbe
from .peek import SocketProbe, peekable


def probe(environ: t.Mapping[str, t.Any]) -> ClientProbe | None:
    """The probe of a gunicorn request, or None when *environ* is not gunicorn's."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        sock = environ.get("gunicorn.sock")
        if sock is None:
            return None
    raw = peekable(sock)
    return SocketProbe(raw) if raw is not None else None


def is_file_wrapper(body: t.Any) -> bool:
    """Is *body* gunicorn's ``wsgi.file_wrapper`` (a file sent as is)?"""
    return getattr(body, "filelike", None) is not None
