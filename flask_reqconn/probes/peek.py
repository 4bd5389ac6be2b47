"""The probe of servers that expose the client's socket: a non-blocking peek.

``recv(1, MSG_PEEK | MSG_DONTWAIT)`` consumes nothing: ``b""`` (EOF) or a
reset means gone, data means unknown (a body or a pipelined request). TLS
sockets cannot be peeked and get no probe. A client that half-closes
(``shutdown(SHUT_WR)``) but still reads also shows EOF: with
``REQCONN_EOF_MEANS_GONE = False`` only a reset counts as gone.
"""

from __future__ import annotations

import _socket
import errno
import select
import socket
import ssl
import sys
import typing as t

_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT
_GONE_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.EBADF})


def peekable(sock: t.Any) -> _socket.socket | None:
    """The plain socket under *sock* if it can be peeked (not TLS), else None."""
    if sock is None or isinstance(sock, ssl.SSLSocket) or hasattr(sock, "_sslobj"):
        return None
    # gevent wraps a real socket; peeking through the wrapper would wait for
    # readability instead of returning at once.
    raw = getattr(sock, "_sock", sock)
    return raw if isinstance(raw, _socket.socket) else None


def readable(fd: int) -> bool:
    """Is there something to read on *fd* (data, EOF, an error), right now?"""
    poll = getattr(select, "poll", None)
    if poll is not None:  # not under gevent's patched select
        p = poll()
        p.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
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
    """A client seen through its socket (gunicorn, the werkzeug dev server)."""

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
