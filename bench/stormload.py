"""The abort storm of the storm-under-load figure: a separate process dropping requests.

``python bench/stormload.py http://127.0.0.1:PORT --count 1000 --seconds 6`` sends
*count* requests spread evenly over *seconds* and drops every one of them, cycling
through four styles (as :mod:`flask_reqconn.storm` does):

``close``   send the request, close at once
``delay``   send, wait 1 ms, close
``rst``     send, close with ``SO_LINGER`` 0 (the server sees a TCP reset)
``stream``  GET ``/stream``, read the first body bytes, close

Prints a JSON summary. Loopback targets only; bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

from loadgen import check_loopback

STYLES = ("close", "delay", "rst", "stream")
_LINGER_RESET = struct.pack("ii", 1, 0)


def _request(path: str, host: str, port: int) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


def abort_one(host: str, port: int, style: str, path: str, stream_path: str) -> str:
    """Send one request and drop it in *style*; return an outcome name."""
    try:
        sock = socket.create_connection((host, port), timeout=5)
    except OSError as exc:
        return f"connect:{type(exc).__name__}"
    try:
        if style == "stream":
            sock.sendall(_request(stream_path, host, port))
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    return "stream:eof"
                data += chunk
            return "stream"
        sock.sendall(_request(path, host, port))
        if style == "delay":
            time.sleep(0.001)
        elif style == "rst":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        return style
    except OSError as exc:
        return f"{style}:{type(exc).__name__}"
    finally:
        sock.close()


def storm(url: str, *, count: int, seconds: float, concurrency: int,
          stream_path: str = "/stream") -> dict[str, Any]:
    check_loopback(url)
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    next_index = 0
    start = time.monotonic()
    deadline = start + seconds + 30  # a hang guard, far past the planned end

    def worker() -> None:
        nonlocal next_index
        while True:
            with lock:
                i = next_index
                next_index += 1
            if i >= count or time.monotonic() > deadline:
                return
            due = start + i * seconds / count
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            outcome = abort_one(host, port, STYLES[i % len(STYLES)], path, stream_path)
            with lock:
                outcomes[outcome] += 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 60)
    return {
        "sent": sum(outcomes.values()),
        "outcomes": dict(sorted(outcomes.items())),
        "seconds": round(time.monotonic() - start, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="paced abort storm (loopback only)")
    parser.add_argument("url", help="the endpoint to abort, e.g. http://127.0.0.1:8000/read")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--stream-path", default="/stream")
    args = parser.parse_args(argv)
    if not 1 <= args.count <= 100_000 or not 0 < args.seconds <= 600:
        parser.error("count must be 1..100000 and seconds 0..600")
    if not 1 <= args.concurrency <= 256:
        parser.error("concurrency must be 1..256")
    result = storm(
        args.url, count=args.count, seconds=args.seconds, concurrency=args.concurrency,
        stream_path=args.stream_path,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
