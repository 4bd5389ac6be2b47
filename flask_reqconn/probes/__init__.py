"""Client probes: is this request's HTTP client still there?

A probe (:class:`ClientProbe`) answers one question for one request: has its client
certainly gone? It is asked right before and right after waiting for a pool connection,
and by the watcher while a query runs. :func:`probe_for` finds it:

- gunicorn and the werkzeug dev server put the client's socket in the environ; their
  modules only declare its keys (``SOCKET_KEYS``), and all the probing is done here, by
  peeking at the socket (:class:`SocketProbe`);
- uWSGI's module hands over a socket of its own (``client_socket(environ)``), peeked the
  same way; waitress's module builds its own probe (``probe(environ)``).

Adding a server (Granian...) is one more module listed in :data:`SERVERS`, offering what
:class:`Server` says.
"""

from __future__ import annotations

import _socket
import errno
import select
import socket
import ssl
import sys
import typing as t
from collections.abc import Callable

from . import gunicorn, uwsgi, waitress, werkzeug
from .workers import Concurrency


class ClientProbe(t.Protocol):
    """How to see one request's client; resolved once per request."""

    @property
    def watchable(self) -> bool:
        """Can the watcher see this client leave (through :meth:`fileno` or by polling)?"""

    def fileno(self) -> int:
        """The client socket's descriptor for ``epoll``, or -1: poll :meth:`gone` instead.

        Only asked when the watcher registers the client, so it may check
        whether ``epoll`` works in this process (not under gevent).
        """

    def gone(self, eof_means_gone: bool = True) -> bool:
        """True only when the client has certainly disconnected. Never blocks or raises.

        :param eof_means_gone: count a half-close (EOF) as gone, not only a reset.
        """

    def cut(self) -> bool:
        """Shut the client's connection down, from any thread: a server blocked sending
        to a client that reads nothing gets an error and ends the request. Never raises.

        :returns: False where the server offers no socket (the client is left alone).
        """


class NoProbe:
    """The probe of a server that exposes nothing: the client is never seen gone."""

    __slots__ = ()

    watchable = False

    def fileno(self) -> int:
        return -1

    def gone(self, eof_means_gone: bool = True) -> bool:
        return False

    def cut(self) -> bool:
        return False


#: The probe for requests of unknown servers.
NO_PROBE = NoProbe()

#: Errors that mean the client closed the connection while the app ran.
CLIENT_ABORT_ERRORS: tuple[type[BaseException], ...] = (
    BrokenPipeError,
    ConnectionResetError,
    ConnectionAbortedError,
)


def is_client_abort(exc: BaseException) -> bool:
    """True if *exc* says the client went away (EPIPE, ECONNRESET, werkzeug's
    ``ClientDisconnected``...)."""
    if isinstance(exc, CLIENT_ABORT_ERRORS):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.EPIPE, errno.ECONNRESET):
        return True
    from werkzeug.exceptions import ClientDisconnected

    return isinstance(exc, ClientDisconnected)


_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT
_GONE_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.EBADF})


#: Python's own socket class; None if gevent patched it before this import (then every
#: socket takes the full check of :func:`peekable`).
_PLAIN_SOCKET = socket.socket if socket.socket.__module__ == "socket" else None


def peekable(sock: t.Any) -> _socket.socket | None:
    """The plain socket under *sock* if it can be peeked (not TLS), else None."""
    if type(sock) is _PLAIN_SOCKET:  # gunicorn's, werkzeug's: the common case
        return sock
    if sock is None or isinstance(sock, ssl.SSLSocket) or hasattr(sock, "_sslobj"):
        return None
    # gevent wraps a real socket; peeking through the wrapper would wait for
    # readability instead of returning at once.
    raw = getattr(sock, "_sock", sock)
    return raw if isinstance(raw, _socket.socket) else None


#: What :func:`readable` asks ``poll()`` about: data, EOF, an error.
_POLL_IN = select.POLLIN | select.POLLERR | select.POLLHUP


def readable(fd: int) -> bool:
    """Is there something to read on *fd* (data, EOF, an error), right now?"""
    poll = getattr(select, "poll", None)
    if poll is not None:  # not under gevent's patched select
        p = poll()
        p.register(fd, _POLL_IN)
        return bool(p.poll(0))
    ready, _, _ = select.select([fd], [], [], 0)
    return bool(ready)


def socket_gone(sock: _socket.socket, *, eof_means_gone: bool = True) -> bool:
    """Peek at *sock* without blocking: True on EOF (if it counts) or a reset.

    A ``poll()`` first: a socket with nothing to read (the common case) is not
    peeked, which would raise (and cost) a ``BlockingIOError``.
    """
    try:
        fd = sock.fileno()
        if fd < 0:
            return True  # closed
        if not readable(fd):
            return False
        data = sock.recv(1, _PEEK_FLAGS)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError as exc:
        return exc.errno in _GONE_ERRNOS
    except Exception:
        return False
    return eof_means_gone and not data


def gevent_patched() -> bool:
    """Has gevent monkey-patched threading (gunicorn's gevent workers)?"""
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey and monkey.is_module_patched("threading"))


def epoll_usable() -> bool:
    """Can the watcher thread wait on client sockets with ``epoll`` in this process?

    Not under gevent: its "thread" is a greenlet, and a real ``epoll.poll``
    would block every greenlet of the worker.
    """
    return hasattr(select, "epoll") and not gevent_patched()


class SocketProbe:
    """A client seen through its socket (gunicorn, the werkzeug dev server, uWSGI).

    A non-blocking peek, ``recv(1, MSG_PEEK | MSG_DONTWAIT)``, consumes nothing: ``b""``
    (EOF) or a reset means gone, data means unknown (a body or a pipelined request).
    TLS sockets cannot be peeked and get no probe. A client that half-closes
    (``shutdown(SHUT_WR)``) but still reads also shows EOF: with
    ``REQCONN_EOF_MEANS_GONE = False`` only a reset counts as gone.
    """

    __slots__ = ("sock",)

    watchable = True

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno() if epoll_usable() else -1

    def gone(self, eof_means_gone: bool = True) -> bool:
        return socket_gone(self.sock, eof_means_gone=eof_means_gone)

    def cut(self) -> bool:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # the descriptor stays the server's
        except OSError:
            return False
        return True


class Server(t.Protocol):
    """What a server module of this package offers (a module, used as an object).

    Each offers ``is_file_wrapper(body)``: is this response body the server's
    ``wsgi.file_wrapper`` (a file, which cannot run queries)? And one way to its client:

    - ``SOCKET_KEYS``, a tuple: the environ keys of the client socket, in the order tried;
    - or ``client_socket(environ)``: the client socket, from outside the environ;
    - or ``probe(environ)``: a :class:`ClientProbe` of its own.

    Optionally, ``concurrency(environ)``: how many requests a worker process runs at
    once (a :class:`Concurrency`), for the pool sizing check (:mod:`flask_reqconn.sizing`).
    The functions return None for an environ that is not their server's.
    """

    def is_file_wrapper(self, body: t.Any) -> bool: ...


#: The server modules, tried in this order.
SERVERS: tuple[Server, ...] = (gunicorn, werkzeug, uwsgi, waitress)

#: The environ keys of every server's client socket, in the order of :data:`SERVERS`.
SOCKET_KEYS: tuple[str, ...] = tuple(
    key for server in SERVERS for key in getattr(server, "SOCKET_KEYS", ())
)
_CLIENT_SOCKETS: tuple[Callable[[t.Mapping[str, t.Any]], _socket.socket | None], ...] = tuple(
    server.client_socket for server in SERVERS if hasattr(server, "client_socket")
)
_PROBES: tuple[Callable[[t.Mapping[str, t.Any]], ClientProbe | None], ...] = tuple(
    server.probe for server in SERVERS if hasattr(server, "probe")
)


def probe_for(environ: t.Mapping[str, t.Any]) -> ClientProbe:
    """The probe of the request of *environ*: a :class:`SocketProbe` on the first client
    socket found that can be peeked (not TLS), else the first server's own probe, else
    :data:`NO_PROBE`."""
    for key in SOCKET_KEYS:
        sock = environ.get(key)
        if sock is not None:
            raw = peekable(sock)
            if raw is not None:
                return SocketProbe(raw)
    for client_socket in _CLIENT_SOCKETS:
        found = client_socket(environ)
        if found is not None:
            return SocketProbe(found)
    for probe in _PROBES:
        own = probe(environ)
        if own is not None:
            return own
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
    "SOCKET_KEYS",
    "ClientProbe",
    "Concurrency",
    "NoProbe",
    "Server",
    "SocketProbe",
    "concurrency_for",
    "is_client_abort",
    "is_file_wrapper",
    "peekable",
    "probe_for",
    "readable",
    "socket_gone",
]
