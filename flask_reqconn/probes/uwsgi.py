"""uWSGI: the client's descriptor, from ``uwsgi.connection_fd()``.

uWSGI puts no socket in the environ; its ``uwsgi`` module (importable only inside
a uWSGI worker) returns the descriptor of the current request's connection: the
HTTP client's with ``--http-socket``, the front server's (nginx ``uwsgi_pass``)
with ``--socket``/``--uwsgi-socket``. The probe borrows that descriptor: a
:class:`BorrowedSocket` wraps it without owning it, so peeking costs no ``dup``
and nothing of flask-reqconn ever closes uWSGI's descriptor.
"""

from __future__ import annotations

import importlib
import socket
import sys
import typing as t

from ..clientgone import socket_gone

#: The environ key uWSGI always sets; nothing is imported when it is absent.
UWSGI_ENVIRON_KEY = "uwsgi.version"


class BorrowedSocket(socket.socket):
    """A socket object over a descriptor it does not own.

    ``close()``, the context manager and garbage collection only detach the
    descriptor, so the server that owns it keeps it open.
    """

    __slots__ = ()

    def __init__(self, fd: int) -> None:
        super().__init__(fileno=fd)

    def close(self) -> None:
        self.detach()

    def __del__(self) -> None:
        self.detach()


class UwsgiProbe:
    """Whether one uWSGI request's client is still there (see the module docstring)."""

    __slots__ = ("sock", "check")

    def __init__(self, fd: int) -> None:
        self.sock: socket.socket | None = BorrowedSocket(fd)
        self.check: t.Callable[[], bool] | None = None

    @property
    def watchable(self) -> bool:
        return self.sock is not None

    def gone(self, eof_means_gone: bool = True) -> bool:
        """True only when the client has certainly disconnected. Never raises."""
        if self.sock is None:
            return False
        return socket_gone(self.sock, eof_means_gone=eof_means_gone)


def probe_from_environ(environ: t.Mapping[str, t.Any]) -> UwsgiProbe | None:
    """A probe for this request if it is served by uWSGI, else None.

    Must be called in the thread serving the request: ``connection_fd()`` answers
    for the current thread's request.
    """
    if UWSGI_ENVIRON_KEY not in environ:
        return None
    uwsgi: t.Any = sys.modules.get("uwsgi")
    if uwsgi is None:
        try:
            uwsgi = importlib.import_module("uwsgi")
        except ImportError:
            return None
    try:
        fd = int(uwsgi.connection_fd())
    except Exception:
        return None
    if fd < 0:
        return None
    try:
        return UwsgiProbe(fd)
    except OSError:  # not a socket (a closed or foreign descriptor)
        return None
