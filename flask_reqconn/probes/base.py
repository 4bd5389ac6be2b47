"""What every client probe offers, and what a departed client looks like as an error.

A probe answers one question for one request: has its HTTP client certainly
gone? Each server family has a module in this package that builds a probe
from the WSGI environ (see :func:`flask_reqconn.probes.probe_for`).
"""

from __future__ import annotations

import errno
import sys
import typing as t


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


class Concurrency(t.NamedTuple):
    """How many requests one worker process of a server runs at once, and why."""

    #: requests at the same time in this process
    requests: int
    #: where the number comes from, as the user set it (``gunicorn gthread --threads 8``)
    source: str
    #: worker processes of the server, each with its own pools (None: unknown)
    processes: int | None = None


def caller_self(cls: type) -> t.Any | None:
    """The ``self`` of the nearest frame up this thread's stack that is a *cls* method.

    How a server's worker or task object is found from inside the app: meant to run
    once per process (it reads every frame's locals), never per request.
    """
    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, cls):
            return obj
        frame = frame.f_back  # type: ignore[assignment]
    return None
