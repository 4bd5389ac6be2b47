"""Is the HTTP client of this request still there?

Used right before and right after waiting for a pool connection (the original
bug's fix): a request whose client already left is answered 499 without
running the view. Detection uses what the WSGI server offers:

- gunicorn sync, gthread and gevent workers: ``environ["gunicorn.socket"]``
  (``"gunicorn.sock"`` under ``gevent_pywsgi``);
- the werkzeug development server: ``environ["werkzeug.socket"]``;
- uWSGI: ``uwsgi.connection_fd()``, borrowed (see :mod:`flask_reqconn.probes.uwsgi`);
- waitress: ``environ["waitress.client_disconnected"]()``, which only changes
  during a request when waitress runs with ``channel_request_lookahead > 0``.

On a socket, a non-blocking ``recv(1, MSG_PEEK)`` consumes nothing: ``b""``
(EOF) or a reset means gone, data means unknown (a body or a pipelined
request). TLS sockets cannot be peeked and are skipped. A client that
half-closes (``shutdown(SHUT_WR)``) but still reads also shows EOF: with
``REQCONN_EOF_MEANS_GONE = False`` only a reset counts as gone.
"""

from __future__ import annotations

import _socket
import errno
import socket
import ssl
import typing as t

_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT
_SOCKET_KEYS = ("gunicorn.socket", "werkzeug.socket", "gunicorn.sock")
_GONE_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.EBADF})

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


def client_socket(environ: t.Mapping[str, t.Any]) -> _socket.socket | None:
    """The client's socket, if the server exposes one that can be peeked."""
    for key in _SOCKET_KEYS:
        sock = environ.get(key)
        if sock is not None:
            if isinstance(sock, ssl.SSLSocket) or hasattr(sock, "_sslobj"):
                return None
            # gevent wraps a real socket; peeking through the wrapper would
            # wait for readability instead of returning at once.
            raw = getattr(sock, "_sock", sock)
            return raw if isinstance(raw, _socket.socket) else None
    return None


class ClientProbe:
    """How to tell whether one request's client is still there, resolved once."""

    __slots__ = ("sock", "check")

    def __init__(self, environ: t.Mapping[str, t.Any]) -> None:
        self.sock = client_socket(environ)
        if self.sock is None and "uwsgi.version" in environ:  # a borrowed descriptor
            from .probes.uwsgi import probe_from_environ

            borrowed = probe_from_environ(environ)
            self.sock = borrowed.sock if borrowed is not None else None
        self.check: t.Callable[[], bool] | None = (
            None if self.sock is not None else environ.get("waitress.client_disconnected")
        )

    @property
    def watchable(self) -> bool:
        return self.sock is not None or self.check is not None

    def gone(self, eof_means_gone: bool = True) -> bool:
        """True only when the client has certainly disconnected. Never raises."""
        if self.sock is not None:
            return socket_gone(self.sock, eof_means_gone=eof_means_gone)
        if self.check is not None:
            try:
                return bool(self.check())
            except Exception:
                return False
        return False


def client_gone(environ: t.Mapping[str, t.Any], *, eof_means_gone: bool = True) -> bool:
    """Return True only when the request's client has certainly disconnected.

    Never blocks, never consumes request data, never raises. False means
    "present or unknown".
    """
    return ClientProbe(environ).gone(eof_means_gone)


def socket_gone(sock: _socket.socket, *, eof_means_gone: bool = True) -> bool:
    """Peek at *sock* without blocking: True on EOF (if it counts) or a reset."""
    try:
        data = sock.recv(1, _PEEK_FLAGS)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError as exc:
        return exc.errno in _GONE_ERRNOS
    except Exception:
        return False
    return eof_means_gone and not data
