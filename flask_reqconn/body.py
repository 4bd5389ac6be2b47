"""The request body arrives before the connection: a slow upload never holds one.

A WSGI server reads a request's body in the request's own thread, as the view
reads ``wsgi.input``. With the eager checkout, a connection taken in
``before_request`` would be held for as long as the client takes to send its
body: a client that sends its headers and then trickles, or stops, keeps that
connection, and a handful of them empty the pool.

So the WSGI wrapper (:mod:`flask_reqconn.middleware`) reads a body of up to
``REQCONN_BODY_BUFFER`` bytes into memory *before* it calls the app, as a
buffering proxy does, and the app reads it from memory (``request.get_data()``,
``request.form``, ``request.files`` and ``request.stream`` work as before). A
larger body (or a chunked one that turns out larger) is left to the view to
read, and that request checks out lazily, at its first ``get_conn()``.

While the wrapper reads, a client that sends nothing for
``REQCONN_BODY_TIMEOUT`` seconds is answered ``408`` (where the server exposes
the client's socket: gunicorn and the werkzeug development server; waitress and
uWSGI read bodies before the app runs). A client that leaves or resets while it
sends its body is answered ``499``, and a malformed chunked body ``400``, with
one INFO line and no traceback, whoever reads the body: the wrapper, or the view
(through :class:`ClientBody`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import typing as t
from collections.abc import Callable, Iterator

from werkzeug.exceptions import BadRequest, HTTPException, RequestTimeout

from .errors import ClientGone
from .names import Stat
from .probes import is_client_abort, probe_for

if t.TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

logger = logging.getLogger(__name__)

#: Set in the environ when the body is left to the view: the request checks out lazily.
BODY_LEFT_TO_VIEW = "flask_reqconn.body_left_to_view"
#: Bytes read from ``wsgi.input`` at a time.
_READ_SIZE = 65536


class BodyError(Exception):
    """Reading the body failed for a reason of the client's: how to answer it."""

    def __init__(self, answer: HTTPException, counter: Stat | None, detail: str) -> None:
        super().__init__(detail)
        #: the response to send (499, 408 or 400)
        self.answer = answer
        #: the stat that counts it
        self.counter = counter
        self.detail = detail


def body_size(environ: WSGIEnvironment) -> int | None:
    """The announced size of the request's body: 0 for none, None for a chunked one."""
    length = environ.get("CONTENT_LENGTH")
    if length:
        try:
            return max(0, int(length))
        except ValueError:
            return 0  # the server or werkzeug rejects it; nothing to buffer
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return None
    return 0


def receive(
    environ: WSGIEnvironment,
    size: int | None,
    limit: int,
    timeout: float | None,
    count: Callable[[Stat], None],
) -> None:
    """Read a body of up to *limit* bytes into memory, or leave it to the view.

    :param size: what :func:`body_size` said (not 0).
    :param limit: ``REQCONN_BODY_BUFFER``; 0 leaves every body to the view.
    :param timeout: ``REQCONN_BODY_TIMEOUT``.
    :param count: counts a failure's stat when the view reads the body.
    :raises BodyError: the client stalled, left, or sent a malformed body.
    """
    stream = environ["wsgi.input"]
    if size is not None and size > limit:
        _leave_to_view(environ, stream, count)
        return
    want = limit + 1 if size is None else size
    chunks: list[bytes] = []
    got = 0
    with _client_timeout(environ, timeout):
        while got < want:
            try:
                chunk = stream.read(min(_READ_SIZE, want - got))
            except Exception as exc:
                raise _body_error(environ, exc, got, size) from exc
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    data = b"".join(chunks)
    if size is not None and got < size:
        raise _body_error(environ, None, got, size)
    if size is None and got > limit:
        _leave_to_view(environ, _Prefixed(data, stream), count)
        return
    environ["wsgi.input"] = io.BytesIO(data)
    if size is None:  # chunked and complete: now of a known length
        environ["CONTENT_LENGTH"] = str(got)


def _leave_to_view(
    environ: WSGIEnvironment, stream: t.Any, count: Callable[[Stat], None]
) -> None:
    environ[BODY_LEFT_TO_VIEW] = True
    environ["wsgi.input"] = ClientBody(stream, environ, count)


class _Prefixed(io.RawIOBase):
    """What was read of a chunked body already, then the rest of it."""

    def __init__(self, head: bytes, rest: t.Any) -> None:
        self._head = io.BytesIO(head)
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: t.Any) -> int:
        n = self._head.readinto(buffer)
        if n:
            return n
        data = self._rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class ClientBody(io.RawIOBase):
    """``wsgi.input`` of a body left to the view: the client's failures become HTTP errors.

    A reset or an early end while the view reads becomes :class:`~flask_reqconn.ClientGone`
    (499) and a malformed chunk ``400 Bad Request``, which Flask answers through the
    app's error handlers, instead of a 500 and a traceback (or, for a body that just
    ends early, a view that goes on with part of it).

    :param count: counts the error's stat (in the default pool's counters).
    """

    def __init__(
        self, stream: t.Any, environ: WSGIEnvironment, count: Callable[[Stat], None]
    ) -> None:
        self._stream = stream
        self._environ = environ
        self._count = count
        self._size = body_size(environ)
        self._got = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: t.Any) -> int:
        want = len(buffer)
        if self._size is not None:
            want = min(want, self._size - self._got)
            if want <= 0:
                return 0
        try:
            data = self._stream.read(want)
        except Exception as exc:
            raise self._failed(exc) from exc
        if not data and self._size is not None:
            raise self._failed(None)  # the client ended the body early
        buffer[: len(data)] = data
        self._got += len(data)
        return len(data)

    def _failed(self, exc: BaseException | None) -> HTTPException:
        error = _body_error(self._environ, exc, self._got, self._size)
        log_body_error(self._environ, error)
        if error.counter is not None:
            self._count(error.counter)
        return error.answer


def _body_error(
    environ: WSGIEnvironment, exc: BaseException | None, got: int, size: int | None
) -> BodyError:
    """What a failed read of the body means: a stall (408), a departure (499) or garbage (400)."""
    of = f"{got} of {size}" if size is not None else f"{got} (chunked)"
    if isinstance(exc, TimeoutError):
        return BodyError(RequestTimeout(), Stat.STALLED, f"the client stalled after {of} bytes")
    if exc is None or is_client_abort(exc) or _ended_early(exc) or probe_for(environ).gone():
        return BodyError(ClientGone(), Stat.CLIENT_GONE, f"the client left after {of} bytes")
    return BodyError(
        BadRequest("The request body is malformed."),
        None,
        f"malformed body after {of} bytes ({type(exc).__name__})",
    )


def _ended_early(exc: BaseException) -> bool:
    """gunicorn's ``NoMoreData`` (an ``IOError`` without errno): the stream ended early."""
    return isinstance(exc, OSError) and exc.errno is None and "No more data" in str(exc)


def log_body_error(environ: WSGIEnvironment, error: BodyError) -> None:
    """One INFO line for a body that could not be read."""
    logger.info(
        "%s while sending the body of %s %s; answered %s",
        error.detail,
        environ.get("REQUEST_METHOD", ""),
        environ.get("PATH_INFO", ""),
        error.answer.code,
    )


@contextlib.contextmanager
def _client_timeout(environ: WSGIEnvironment, timeout: float | None) -> Iterator[None]:
    """A read of the client socket that waits longer than *timeout* raises ``TimeoutError``."""
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    settimeout = getattr(sock, "settimeout", None)
    if timeout is None or settimeout is None:
        yield
        return
    before = sock.gettimeout()  # type: ignore[union-attr]
    settimeout(timeout)
    yield  # left set when the body failed: the server's own drain of it stops too
    with contextlib.suppress(OSError):
        settimeout(before)
