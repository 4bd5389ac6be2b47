"""The werkzeug development server (``flask run``).

The client socket is ``environ["werkzeug.socket"]``. The server offers no
``wsgi.file_wrapper``, so ``send_file`` uses werkzeug's own ``FileWrapper``.
"""

from __future__ import annotations

import typing as t

from werkzeug.wsgi import FileWrapper

from .base import ClientProbe
from .peek import SocketProbe, peekable


def probe(environ: t.Mapping[str, t.Any]) -> ClientProbe | None:
    """The probe of a werkzeug request, or None when *environ* is not werkzeug's."""
    sock = environ.get("werkzeug.socket")
    if sock is None:
        return None
    raw = peekable(sock)
    return SocketProbe(raw) if raw is not None else None


def is_file_wrapper(body: t.Any) -> bool:
    """Is *body* werkzeug's ``FileWrapper`` (a file sent as is)?"""
    return isinstance(body, FileWrapper)
