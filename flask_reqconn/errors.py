"""Exceptions raised by flask-reqconn.

The surface is small on purpose: :class:`ReqConnError` for misuse,
:class:`ConfigError` for bad configuration, and two HTTP exceptions that Flask
turns into responses (and that users may handle with ``app.errorhandler``).
"""

from __future__ import annotations

import typing as t

from werkzeug.exceptions import HTTPException, ServiceUnavailable

if t.TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment
    from werkzeug.sansio.response import Response as SansIOResponse
    from werkzeug.wrappers.request import Request as WSGIRequest
    from werkzeug.wrappers.response import Response


class ReqConnError(RuntimeError):
    """flask-reqconn was used in a way that cannot work; the message says how to fix it."""


class ConfigError(ReqConnError, ValueError):
    """A ``REQCONN_*`` configuration value is missing or invalid.

    Raised by :meth:`ReqConn.init_app`; the message names the key.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class ConnectionReleased(ReqConnError):
    """The request's connection was already given back to the pool.

    Raised by :func:`get_conn` when the lease ended before the caller asked for
    it again, for example in code that runs after the stream was closed.
    """


class PoolExhausted(ServiceUnavailable):
    """No connection could be had within ``REQCONN_TIMEOUT`` (or the wait queue is full).

    Flask answers it with ``503 Service Unavailable`` and a ``Retry-After``
    header. Register an error handler for this class to change the response.
    The psycopg_pool error is chained as ``__cause__``.

    :param pool_name: the name of the pool that could not give a connection.
    :param retry_after: seconds for the ``Retry-After`` header.
    """

    description = (
        "The server has no free database connection right now. Please try again shortly."
    )

    def __init__(self, pool_name: str = "default", retry_after: int | None = 1) -> None:
        super().__init__(retry_after=retry_after)
        self.pool_name = pool_name


class DatabaseUnavailable(ServiceUnavailable):
    """The request's database connection was lost while it ran (a restart, a crash, a
    terminated backend, a dead network path).

    Flask answers it with ``503 Service Unavailable`` and a ``Retry-After`` header
    instead of a 500 traceback. Register an error handler for this class to change
    the response. The psycopg error is chained as ``__cause__``.

    :param pool_name: the name of the pool whose connection was lost.
    :param retry_after: seconds for the ``Retry-After`` header.
    """

    description = (
        "The server lost its database connection while answering. Please try again shortly."
    )

    def __init__(self, pool_name: str = "default", retry_after: int | None = 1) -> None:
        super().__init__(retry_after=retry_after)
        self.pool_name = pool_name


class ClientGone(HTTPException):
    """The HTTP client disconnected before the view ran; the request was skipped.

    Answered as ``499 Client Closed Request`` (nginx's code), which only shows
    up in access logs since nobody is left to read it.
    """

    code = 499
    name = "Client Closed Request"
    description = "The client closed the connection before the request was processed."

    def get_response(  # type: ignore[override]
        self,
        environ: WSGIEnvironment | WSGIRequest | None = None,
        scope: dict[str, t.Any] | None = None,
    ) -> Response | SansIOResponse:
        response = super().get_response(environ, scope)  # type: ignore[arg-type]
        response.status = "499 Client Closed Request"
        return response
