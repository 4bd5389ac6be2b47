"""The werkzeug development server (``flask run``).

The client socket is ``environ["werkzeug.socket"]``, peeked by :mod:`flask_reqconn.probes`.
The server offers no ``wsgi.file_wrapper``, so ``send_file`` uses werkzeug's own
``FileWrapper``.
"""

from __future__ import annotations

import typing as t

from werkzeug.wsgi import FileWrapper

#: The environ key of the client socket.
SOCKET_KEYS = ("werkzeug.socket",)


def is_file_wrapper(body: t.Any) -> bool:
    """Is *body* werkzeug's ``FileWrapper`` (a file sent as is)?"""
    return isinstance(body, FileWrapper)
