"""A minimal HTTP/1.1 client on raw sockets, and the loopback guard.

The storm needs what HTTP libraries hide: closing a connection right after sending, with a
TCP reset, or after the first chunk of a stream; sending a body one byte at a time, or
part of it and then nothing; reading a stream no further. Every request sends
``Connection: close`` and is bounded by a deadline.
"""

from __future__ import annotations

import errno
import ipaddress
import select
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .config import StormError

#: The ``User-Agent`` of every storm request (and the oracle's ``application_name``).
USER_AGENT = "flask-reqconn-storm"
#: Largest response body kept (the stats oracle's JSON).
MAX_BODY_BYTES = 1024 * 1024

_MAX_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Target:
    """A resolved ``http://`` URL: where to connect and what to send as ``Host`` and path."""

    url: str
    family: int
    sockaddr: tuple[Any, ...]
    host_header: str
    path: str


def is_loopback(address: str) -> bool:
    """Is this IP address (v4, v6 or v4-mapped v6) a loopback one?"""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def resolve(url: str, *, allow_remote: bool, what: str) -> Target:
    """Resolve *url* and refuse it unless every address is loopback or *allow_remote*.

    :param what: how the URL is named in errors (``"target"``, ``"stats URL"``).
    :raises StormError: not ``http://``, no host, unresolvable, or not loopback.
    """
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise StormError(
            f"{what} {url!r}: only plain http:// URLs are supported; "
            "point the storm at the server's HTTP port"
        )
    host = parts.hostname
    if not host:
        raise StormError(f"{what} {url!r} has no host")
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise StormError(f"{what} {url!r}: {exc}") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise StormError(f"{what} {url!r}: cannot resolve {host!r}: {exc}") from None
    if not infos:
        raise StormError(f"{what} {url!r}: {host!r} resolves to nothing")
    if not allow_remote:
        remote = sorted({str(info[4][0]) for info in infos if not is_loopback(str(info[4][0]))})
        if remote:
            raise StormError(
                f"refusing {what} {url!r}: {host} resolves to {', '.join(remote)}, which is not "
                "a loopback address (127.0.0.0/8, ::1, localhost). The storm is a load "
                "generator meant for your own app on this machine; pass --allow-remote "
                "(allow_remote=True) only for a server you operate."
            )
    family, _type, _proto, _canon, sockaddr = infos[0]
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(url, family, tuple(sockaddr), parts.netloc.rpartition("@")[2], path)


def request_bytes(target: Target, headers: Sequence[tuple[str, str]]) -> bytes:
    """The bytes of a ``GET`` of *target* with ``Connection: close``."""
    lines = [
        f"GET {target.path} HTTP/1.1",
        f"Host: {target.host_header}",
        f"User-Agent: {USER_AGENT}",
        "Accept: */*",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
        "",
        "",
    ]
    return "\r\n".join(lines).encode("latin-1")


def post_head_bytes(
    target: Target, headers: Sequence[tuple[str, str]], length: int
) -> bytes:
    """The head of a ``POST`` of *target* announcing a body of *length* bytes."""
    lines = [
        f"POST {target.path} HTTP/1.1",
        f"Host: {target.host_header}",
        f"User-Agent: {USER_AGENT}",
        "Accept: */*",
        "Content-Type: application/octet-stream",
        f"Content-Length: {length}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
        "",
        "",
    ]
    return "\r\n".join(lines).encode("latin-1")


class ProtocolError(Exception):
    """A response that is not HTTP/1.x or ends early; *kind* names it in the report."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


def _connect(target: Target, deadline: float, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(target.family, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:  # before connect, so that the advertised window is small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(_remaining(deadline))
        sock.connect(target.sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


class _Reader:
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buf = bytearray()

    def fill(self) -> bool:
        self.sock.settimeout(_remaining(self.deadline))
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def read_until(self, marker: bytes, limit: int) -> bytes:
        start = 0
        while True:
            index = self.buf.find(marker, start)
            if index >= 0:
                line = bytes(self.buf[:index])
                del self.buf[: index + len(marker)]
                return line
            if len(self.buf) > limit:
                raise ProtocolError("BadResponse", "header or chunk line too long")
            start = max(0, len(self.buf) - len(marker) + 1)
            if not self.fill():
                raise ProtocolError("IncompleteResponse", "closed mid-response")

    def take(self, size: int, keep: bytearray | None) -> None:
        while len(self.buf) < size:
            if keep is None and self.buf:
                size -= len(self.buf)
                self.buf.clear()
            if not self.fill():
                raise ProtocolError("IncompleteResponse", "closed before end of body")
        if keep is not None:
            keep += self.buf[:size]
        del self.buf[:size]

    def take_all(self, keep: bytearray | None) -> None:
        while True:
            if keep is not None:
                keep += self.buf
            self.buf.clear()
            if not self.fill():
                return


def _read_head(reader: _Reader) -> tuple[int, dict[str, str]]:
    while True:
        head = reader.read_until(b"\r\n\r\n", _MAX_HEAD_BYTES)
        status_line, _, rest = head.partition(b"\r\n")
        fields = status_line.split(None, 2)
        if len(fields) < 2 or not fields[0].startswith(b"HTTP/1.") or not fields[1].isdigit():
            raise ProtocolError("BadResponse", f"status line {status_line[:80]!r}")
        status = int(fields[1])
        headers: dict[str, str] = {}
        for line in rest.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if sep:
                headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        if 100 <= status < 200:
            continue  # an interim response (100 Continue, 103 Early Hints); read the next
        return status, headers


def _read_body(
    reader: _Reader, status: int, headers: dict[str, str], keep: bytearray | None
) -> None:
    if status in (204, 304):
        return
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            line = reader.read_until(b"\r\n", 8192)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ProtocolError("BadResponse", f"chunk size {line[:40]!r}") from None
            if size == 0:
                while reader.read_until(b"\r\n", _MAX_HEAD_BYTES):
                    pass  # trailers, up to the empty line
                return
            reader.take(size, keep)
            if reader.read_until(b"\r\n", 2):
                raise ProtocolError("BadResponse", "chunk not followed by CRLF")
    elif "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise ProtocolError("BadResponse", "bad Content-Length") from None
        reader.take(length, keep)
    else:
        reader.take_all(keep)


def http_get(
    target: Target, request: bytes, deadline: float, keep: bytearray | None = None
) -> int:
    """GET *target* by the *deadline*; return the status, the body appended to *keep*."""
    with _connect(target, deadline) as sock:
        sock.settimeout(_remaining(deadline))
        sock.sendall(request)
        reader = _Reader(sock, deadline)
        status, headers = _read_head(reader)
        _read_body(reader, status, headers, keep)
        if keep is not None and len(keep) > MAX_BODY_BYTES:
            raise ProtocolError("BadResponse", "body too large")
    return status


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ProtocolError):
        return f"ERR:{exc.kind}"
    name = type(exc).__name__
    if type(exc) is OSError and isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
    return "ERR:" + name.removesuffix("Error")


@dataclass
class Outcome:
    """One request of a phase: how long it took and how it ended."""

    latency_ms: float
    status: int | None = None
    error: str | None = None
    aborted: bool = False
    style: str | None = None
    #: the client reset its connection before it had sent its whole body
    reset_mid_body: bool = False


def timed_get(target: Target, request: bytes, timeout: float, deadline: float) -> Outcome:
    """One GET within *timeout* (and the phase's *deadline*); errors become the outcome."""
    start = time.monotonic()
    try:
        status = http_get(target, request, min(start + timeout, deadline))
    except (OSError, ProtocolError) as exc:
        return Outcome((time.monotonic() - start) * 1000, error=_error_name(exc))
    return Outcome((time.monotonic() - start) * 1000, status=status)


_LINGER_RESET = struct.pack("ii", 1, 0)


def aborted_request(
    target: Target, request: bytes, style: str, delay: float, deadline: float
) -> Outcome:
    """Send the request and drop the connection the way *style* says (:data:`ABORT_STYLES`).

    ``body-reset``: *request* is a POST's head and part of its body; *delay* later the
    connection is reset.
    """
    start = time.monotonic()
    status: int | None = None
    try:
        with _connect(target, deadline) as sock:
            sock.settimeout(_remaining(deadline))
            sock.sendall(request)
            if style == "delay":
                time.sleep(delay)
            elif style in ("rst", "body-reset"):
                if style == "body-reset":
                    time.sleep(min(delay, _remaining(deadline)))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            elif style == "stream":
                reader = _Reader(sock, deadline)
                status, _headers = _read_head(reader)
                if not reader.buf:
                    reader.fill()  # the first body bytes, or EOF for an empty body
    except (OSError, ProtocolError) as exc:
        return Outcome(
            (time.monotonic() - start) * 1000, status, _error_name(exc), style=style
        )
    return Outcome((time.monotonic() - start) * 1000, status, aborted=True, style=style)


#: The receive buffer of a ``stop-reading`` client: the server's sends block soon.
STOP_READING_RCVBUF = 4096
#: Body bytes a ``stalled-body`` client sends before it stops.
STALLED_BODY_BYTES = 10


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def _answer(sock: socket.socket, deadline: float) -> int:
    """The status of a response the server sent while the client was still sending."""
    return _read_head(_Reader(sock, deadline))[0]


def stalled_request(
    target: Target,
    request: bytes,
    style: str,
    *,
    body_size: int,
    body_interval: float,
    window_end: float,
) -> Outcome:
    """One request of the stall phase (:data:`~flask_reqconn.storm.config.STALL_STYLES`),
    held until *window_end* at the latest.

    ``slow-body`` and ``stalled-body``: *request* is a POST's head announcing *body_size*
    bytes; ``slow-body`` then sends one byte every *body_interval*, ``stalled-body``
    :data:`STALLED_BODY_BYTES` and then nothing. When the server answers meanwhile (a 408,
    or a buffering proxy's answer), the outcome has its status; at *window_end* the
    connection is reset (``reset_mid_body``). ``stop-reading``: *request* is a GET of a
    stream; the head and the first bytes are read, then nothing more until *window_end*.
    """
    start = time.monotonic()
    status: int | None = None
    reset_mid_body = False
    try:
        rcvbuf = STOP_READING_RCVBUF if style == "stop-reading" else None
        with _connect(target, window_end, rcvbuf) as sock:
            sock.settimeout(_remaining(window_end))
            if style == "stop-reading":
                sock.sendall(request)
                reader = _Reader(sock, window_end)
                status, _headers = _read_head(reader)
                if not reader.buf:
                    reader.fill()
                time.sleep(max(0.0, window_end - time.monotonic()))  # reads nothing more
                return Outcome((time.monotonic() - start) * 1000, status, aborted=True,
                               style=style)  # fmt: skip
            first = 0 if style == "slow-body" else min(STALLED_BODY_BYTES, body_size - 1)
            sock.sendall(request + b"x" * first)
            sent = first
            while True:
                left = window_end - time.monotonic()
                if left <= 0:
                    break
                pause = left if style == "stalled-body" else min(body_interval, left)
                readable, _, _ = select.select([sock], [], [], pause)
                if readable:  # the server answered (or closed) before the body was in
                    status = _answer(sock, min(time.monotonic() + 2.0, window_end + 2.0))
                    return Outcome((time.monotonic() - start) * 1000, status, style=style)
                if style == "slow-body" and time.monotonic() < window_end:
                    sock.sendall(b"x")
                    sent += 1
                    if sent == body_size:
                        reader = _Reader(sock, window_end)
                        status, headers = _read_head(reader)
                        _read_body(reader, status, headers, None)
                        return Outcome((time.monotonic() - start) * 1000, status, style=style)
            _reset(sock)
            reset_mid_body = True
    except (OSError, ProtocolError) as exc:
        return Outcome((time.monotonic() - start) * 1000, status, _error_name(exc),
                       style=style, reset_mid_body=reset_mid_body)  # fmt: skip
    return Outcome((time.monotonic() - start) * 1000, status, aborted=True, style=style,
                   reset_mid_body=reset_mid_body)  # fmt: skip
