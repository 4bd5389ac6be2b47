"""How a streamed response answers a lost database connection.

A streamed body runs after Flask's error handling, while the WSGI server pulls
its chunks, so the error of a connection lost in it never reaches Flask's error
handlers. The WSGI wrapper (:mod:`flask_reqconn.middleware`) answers it itself:

- :class:`HeldStart` passes a streamed response's status line and headers on
  with its first chunk; a body whose connection is lost before that is
  answered by the app's error handling for
  :class:`~flask_reqconn.DatabaseUnavailable` instead (503 with ``Retry-After``
  by default), headers and all;
- once a chunk was sent the stream can only be cut off: the server gets a
  :class:`StreamCut` (a broken pipe) instead of psycopg's error, which
  gunicorn and the werkzeug development server log at DEBUG.
"""

from __future__ import annotations

import errno
import typing as t
from collections.abc import Callable, Iterable

from .errors import keep_retry_after

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment
    from flask import Flask

    from .errors import DatabaseUnavailable
    from .lease import Lease


class StreamCut(BrokenPipeError):
    """A streamed response cut off: its database connection was lost after its first chunk.

    Raised to the WSGI server in place of the psycopg error, once flask-reqconn
    has released the connection and logged the cause. It is a broken pipe
    (``errno.EPIPE``) on purpose: gunicorn (sync, gthread, gevent) and the
    werkzeug development server then close the client's connection and log it
    at DEBUG, instead of an error with a traceback per request. The client sees
    an incomplete body (no last chunk, or fewer bytes than ``Content-Length``).
    """

    def __init__(self, lease: Lease) -> None:
        super().__init__(
            errno.EPIPE,
            f"flask-reqconn: the database connection of {lease.method} {lease.path} was"
            " lost while its response was streamed; the stream was cut off",
        )


class HeldStart:
    """A streamed body's status line and headers, held until its first chunk.

    Flask calls ``start_response`` before a streamed body has run. For such a
    body the WSGI wrapper keeps the status line and headers here (:meth:`hold`)
    and passes them on with the first chunk, the end of the body, or a
    ``write()``, as PEP 3333 allows. A body whose connection is lost before its
    first chunk can then be answered with a response of its own (:meth:`answer`),
    headers included: a second ``start_response`` with ``exc_info`` would do, but
    gunicorn adds the second call's headers to the first's (two ``Content-Type``
    headers).
    """

    __slots__ = ("_start_response", "_environ", "_app", "_held", "_write")

    def __init__(self, start_response: StartResponse, environ: WSGIEnvironment, app: Flask) -> None:
        self._start_response = start_response
        self._environ = environ
        self._app = app
        self._held: tuple[str, list[tuple[str, str]]] | None = None
        self._write: Callable[[bytes], object] | None = None

    def hold(self, status: str, headers: list[tuple[str, str]]) -> Callable[[bytes], object]:
        """Keep the status line and headers; the returned ``write()`` passes them on first."""
        self._held = (status, headers)
        return self._write_held

    def drop(self) -> None:
        """Forget what is held: the app restarted the response (``exc_info``)."""
        self._held = None

    def release(self) -> None:
        """Pass the held status line and headers on to the server, if any."""
        held = self._held
        if held is not None:
            self._held = None
            self._write = self._start_response(*held)

    def _write_held(self, data: bytes) -> object:
        self.release()
        assert self._write is not None
        return self._write(data)

    def answer(self, error: DatabaseUnavailable) -> Iterable[bytes]:
        """*error* answered by the app, instead of the held status line.

        The app's error handling as Flask runs it for a view (the handler for
        ``DatabaseUnavailable``, or its own 503 page; then the ``after_request``
        functions), in a request context pushed again from the environ. If the
        status line was passed on already, ``start_response`` is called again
        with ``exc_info`` (a server that sent the headers re-raises the error).
        """
        app, environ = self._app, self._environ
        with app.request_context(environ):
            keep_retry_after(error)  # for this context: the handler may drop the header
            rv = app.handle_http_exception(error)
            response = app.finalize_request(rv, from_error_handler=True)
        start_response = self._start_response
        if self._held is not None:
            self._held = None
            body: Iterable[bytes] = response(environ, start_response)
            return body
        cause = error.__cause__ or error
        exc_info = (type(cause), cause, cause.__traceback__)

        def restart(status: str, headers: list[tuple[str, str]], _: t.Any = None) -> t.Any:
            return start_response(status, headers, exc_info)  # type: ignore[arg-type]

        body = response(environ, restart)
        return body
