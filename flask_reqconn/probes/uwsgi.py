"""uWSGI: the client's descriptor, from ``uwsgi.connection_fd()``.

uWSGI puts no socket in the environ; its ``uwsgi`` module (importable only inside
a uWSGI worker) returns the descriptor of the current request's connection: the
HTTP client's with ``--http-socket``, the front server's (nginx ``uwsgi_pass``)
with ``--socket``/``--uwsgi-socket``. :func:`client_socket` borrows that descriptor,
which :mod:`flask_reqconn.probes` peeks: a :class:`BorrowedSocket` wraps it without
owning it, so peeking costs no ``dup`` and nothing of flask-reqconn ever closes
uWSGI's descriptor.
"""

from __future__ import annotations

import importlib
import socket
import sys
import typing as t

from .workers import Concurrency

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


def client_socket(environ: t.Mapping[str, t.Any]) -> BorrowedSocket | None:
    """The client socket of a uWSGI request, borrowed, or None when *environ* is not
    uWSGI's.

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
        return BorrowedSocket(fd)
    except OSError:  # not a socket (a closed or foreign descriptor)
        return None


def concurrency(environ: t.Mapping[str, t.Any]) -> Concurrency | None:
    """uWSGI's ``--threads`` of this worker (``uwsgi.opt``; 1 without it), or None."""
    if UWSGI_ENVIRON_KEY not in environ:
        return None
    uwsgi: t.Any = sys.modules.get("uwsgi")
    try:
        value = uwsgi.opt.get("threads") if uwsgi is not None else None
    except Exception:
        return None
    if isinstance(value, list):  # an option given twice
        value = value[-1]
    if isinstance(value, bytes):
        value = value.decode()
    try:
        threads = int(value) if value is not None else 1
    except ValueError:
        return None
    return Concurrency(threads, f"uWSGI, --threads {threads}")



def is_file_wrapper(body: t.Any) -> bool:
    """Never: uWSGI's file wrapper is not recognised, so its connection is kept until
    ``close()`` (safe, only later)."""
    return False
