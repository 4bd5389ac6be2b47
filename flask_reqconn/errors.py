"""Exceptions raised by flask-reqconn.

The surface is small on purpose: :class:`ReqConnError` for misuse,
:class:`ConfigError` for bad configuration, and two HTTP exceptions that Flask
turns into responses (and that users may handle with ``app.errorhandler``).
"""

from __future__ import annotations

import functools
import typing as t
from datetime import datetime

from flask import after_this_request, has_request_context
from werkzeug.exceptions import HTTPException, ServiceUnavailable
from werkzeug.http import http_date

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


def keep_retry_after(error: ServiceUnavailable) -> None:
    """Make the current request's ``503`` answer carry *error*'s ``Retry-After``.

    An app's error handler (for ``HTTPException``, ``503``, or the library's
    exceptions) often builds a response of its own, without the exception's
    headers. This registers, for the current request only
    (``flask.after_this_request``), a function that adds the header to the
    response if its status is ``503`` and it has no ``Retry-After`` of its
    own: a request that never raises one pays nothing. Outside a request, or
    without a ``retry_after``, it does nothing. Called by the constructors of
    :class:`PoolExhausted` and :class:`DatabaseUnavailable`.
    """
    if error.retry_after is None or not has_request_context():
        return
    after_this_request(functools.partial(_add_retry_after, error.retry_after))


def _add_retry_after(retry_after: datetime | int, response: Response) -> Response:
    if response.status_code == 503 and "Retry-After" not in response.headers:
        value = http_date(retry_after) if isinstance(retry_after, datetime) else str(retry_after)
        response.headers["Retry-After"] = value
    return response


class PoolExhausted(ServiceUnavailable):
    """No connection could be had within ``REQCONN_TIMEOUT`` (or the wait queue is full).

    Flask answers it with ``503 Service Unavailable`` and a ``Retry-After``
    header. Register an error handler for this class to change the response;
    a ``503`` it returns without a ``Retry-After`` gets this one's
    (see ``keep_retry_after``). The psycopg_pool error is chained as ``__cause__``.

    :param pool_name: the name of the pool that could not give a connection.
    :param retry_after: seconds for the ``Retry-After`` header.
    """

    description = (
        "The server has no free database connection right now. Please try again shortly."
    )

    def __init__(self, pool_name: str = "default", retry_after: int | None = 1) -> None:
        super().__init__(retry_after=retry_after)
        self.pool_name = pool_name
        keep_retry_after(self)


class DatabaseRefused(PoolExhausted):
    """No connection could be had within ``REQCONN_TIMEOUT`` while the database refused
    new connections or could not be reached ("too many clients", a failed login, a
    closed port, an unknown host).

    A :class:`PoolExhausted`, so handlers and ``except`` clauses for it still apply;
    Flask answers it with ``503 Service Unavailable`` and a ``Retry-After`` header.

    :param pool_name: the name of the pool that could not give a connection.
    :param retry_after: seconds for the ``Retry-After`` header.
    :param cause: why the pool's last connection attempt failed, without secrets.
    """

    description = (
        "The database refused the server's connections or could not be reached."
        " Please try again shortly."
    )

    def __init__(
        self, pool_name: str = "default", retry_after: int | None = 1, cause: str = ""
    ) -> None:
        super().__init__(pool_name, retry_after)
        self.cause = cause


class DatabaseUnavailable(ServiceUnavailable):
    """The request's database connection was lost while it ran (a restart, a crash, a
    terminated backend, a dead network path).

    Flask answers it with ``503 Service Unavailable`` and a ``Retry-After`` header
    instead of a 500 traceback. Register an error handler for this class to change
    the response; a ``503`` it returns without a ``Retry-After`` gets this one's
    (see ``keep_retry_after``). The psycopg error is chained as ``__cause__``.

    :param pool_name: the name of the pool whose connection was lost.
    :param retry_after: seconds for the ``Retry-After`` header.
    """

    description = (
        "The server lost its database connection while answering. Please try again shortly."
    )

    def __init__(self, pool_name: str = "default", retry_after: int | None = 1) -> None:
        super().__init__(retry_after=retry_after)
        self.pool_name = pool_name
        keep_retry_after(self)


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
