"""One small HTTP/1.1 client over raw sockets, for tests, benchmarks and the demo.

Each call opens a fresh connection (``Connection: close``), so a test sees exactly one
request per connection, and aborts are real: a FIN, or a RST with ``SO_LINGER`` 0.
No proxies, no redirects, no TLS.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "get_json",
    "http_get",
    "raw_connect",
    "read_first_chunk_and_drop",
    "send_and_close",
]


def _split(url: str, path: str | None = None) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"need an http:// URL, got {url!r}")
    if path is None:
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
    else:
        target = path if path.startswith("/") else "/" + path
    return parts.hostname, parts.port or 80, target


def _request(host: str, port: int, target: str, headers: Mapping[str, str] | None) -> bytes:
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return status, headers


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            raise ValueError("truncated chunked body")
        size = int(data[pos:eol].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        start = eol + 2
        if start + size > len(data):
            raise ValueError("truncated chunked body")
        out += data[start : start + size]
        pos = start + size + 2


def http_get(
    url: str, timeout: float = 10, headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """GET ``url`` over a fresh connection; return (status, headers, body).

    Header names are lower-cased (repeated headers joined with ", "); a chunked body is
    decoded. Reads until the server closes the connection (we send ``Connection: close``).
    """
    host, port, target = _split(url)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(_request(host, port, target, headers))
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks)
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ConnectionError(f"incomplete response from {url}: {raw[:200]!r}")
    status, hdrs = _parse_head(head)
    if "chunked" in hdrs.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    elif "content-length" in hdrs and len(body) < int(hdrs["content-length"]):
        raise ConnectionError(
            f"short body from {url}: {len(body)} of {hdrs['content-length']} bytes"
        )
    return status, hdrs, body


def _abort(sock: socket.socket, how: str) -> None:
    if how == "rst":
        # linger on, timeout 0: close() sends RST instead of FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def send_and_close(
    url: str,
    path: str,
    *,
    how: str = "close",
    ms: float = 1,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Send ``GET path`` to the server at ``url`` and drop the connection at once.

    ``how``: ``"close"`` closes right after sending (FIN); ``"rst"`` closes with SO_LINGER 0
    (RST); ``"after_ms"`` waits ``ms`` milliseconds, then closes normally.
    """
    if how not in ("close", "rst", "after_ms"):
        raise ValueError(f"how must be 'close', 'rst' or 'after_ms', not {how!r}")
    host, port, target = _split(url, path)
    sock = socket.create_connection((host, port), timeout=10)
    try:
        sock.sendall(_request(host, port, target, headers))
        if how == "after_ms":
            time.sleep(ms / 1000)
    finally:
        _abort(sock, "rst" if how == "rst" else "close")


def read_first_chunk_and_drop(
    url: str,
    path: str,
    *,
    how: str = "close",
    timeout: float = 10,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, bytes]:
    """GET a streamed response, read until the first body bytes arrive, then drop it.

    Returns (status, body bytes received so far, still chunk-encoded if chunked).
    ``how`` is ``"close"`` (FIN) or ``"rst"``.
    """
    if how not in ("close", "rst"):
        raise ValueError(f"how must be 'close' or 'rst', not {how!r}")
    host, port, target = _split(url, path)
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.sendall(_request(host, port, target, headers))
        raw = b""
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"server closed before the body started: {raw[:300]!r}")
            raw += data
            head, sep, body = raw.partition(b"\r\n\r\n")
            if sep and body:
                status, _hdrs = _parse_head(head)
                return status, body
    finally:
        _abort(sock, how)


def raw_connect(url: str, timeout: float = 10) -> socket.socket:
    """A connected socket to the server at ``url``, for hand-made requests."""
    host, port, _target = _split(url)
    return socket.create_connection((host, port), timeout=timeout)


def get_json(url: str, timeout: float = 10) -> Any:
    """GET *url* and decode its JSON body; ``AssertionError`` unless the status is 200."""
    status, _headers, body = http_get(url, timeout=timeout)
    if status != 200:
        raise AssertionError(f"GET {url}: status {status}: {body[:300]!r}")
    return json.loads(body)
