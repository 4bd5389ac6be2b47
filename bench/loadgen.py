"""HTTP load from a separate process: wrk if installed, else a small Python client.

Both return the same dict: ``rps``, ``p50_ms``, ``p99_ms``, ``requests``, ``errors``
(socket errors and timeouts), ``non2xx`` and ``tool``. Every run is bounded by its
duration; targets must be on loopback.

The Python client (``python bench/loadgen.py URL -c 8 -d 3``) keeps one HTTP/1.1
connection per thread (reconnecting when the server closes it, as gunicorn's sync
worker does after every response). It is much slower than wrk and shares the
machine's two cores with the server, so its figures are only comparable with each
other.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from typing import Any
from urllib.parse import urlsplit

WRK = shutil.which("wrk")
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    addr = socket.gethostbyname(host)
    if not ipaddress.ip_address(addr).is_loopback:
        raise SystemExit(f"refusing to load {url}: {addr} is not a loopback address")


def run_load(url: str, *, connections: int, duration: float, timeout: float = 5.0,
             force_python: bool = False) -> dict[str, Any]:
    """Load *url* for *duration* seconds with *connections* concurrent clients."""
    check_loopback(url)
    if WRK and not force_python:
        return run_wrk(url, connections=connections, duration=duration, timeout=timeout)
    cmd = [
        sys.executable, __file__, url, "-c", str(connections), "-d", f"{duration:g}",
        "--timeout", f"{timeout:g}",
    ]  # fmt: skip
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration + timeout + 30, check=True
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def run_wrk(url: str, *, connections: int, duration: float, timeout: float) -> dict[str, Any]:
    assert WRK is not None
    cmd = [
        WRK, "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s",
        f"--timeout={max(1, math.ceil(timeout))}s", "--latency", url,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=True)
    return parse_wrk(out.stdout)


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(text: str) -> dict[str, Any]:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+),", text)
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", text, re.M)
    if not (rps and total and p50 and p99):
        raise ValueError(f"unexpected wrk output:\n{text}")
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors = sum(int(g) for g in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {
        "tool": "wrk",
        "rps": float(rps.group(1)),
        "requests": int(total.group(1)),
        "p50_ms": _ms(p50.group(1)),
        "p99_ms": _ms(p99.group(1)),
        "errors": errors,
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
    }


# --------------------------------------------------------------------------------------
# The Python client
# --------------------------------------------------------------------------------------


def _read_response(sock: socket.socket, buf: bytearray) -> tuple[int, bool]:
    """Read one response from *sock*; return (status, server closes the connection)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response head")
        buf += chunk
    end = buf.index(b"\r\n\r\n")
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    del buf[: end + 4]
    status = int(head[0].split()[1])
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    closes = headers.get("connection") == "close"
    if "content-length" in headers:
        need = int(headers["content-length"])
        while len(buf) < need:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed in the body")
            buf += chunk
        del buf[:need]
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            while b"\r\n0\r\n\r\n" not in buf and not buf.startswith(b"0\r\n\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed in a chunked body")
                buf += chunk
            marker = b"0\r\n\r\n" if buf.startswith(b"0\r\n\r\n") else b"\r\n0\r\n\r\n"
            del buf[: buf.index(marker) + len(marker)]
            break
    else:
        closes = True
        while sock.recv(65536):
            pass
    return status, closes


def python_load(url: str, connections: int, duration: float, timeout: float) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    latencies: list[list[float]] = [[] for _ in range(connections)]
    counts = {"errors": 0, "non2xx": 0}
    lock = threading.Lock()
    start = time.monotonic()
    end = start + duration

    def worker(i: int) -> None:
        sock: socket.socket | None = None
        buf = bytearray()
        mine = latencies[i]
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                if sock is None:
                    sock = socket.create_connection((host, port), timeout=timeout)
                    buf.clear()
                sock.sendall(request)
                status, closes = _read_response(sock, buf)
            except OSError:
                with lock:
                    counts["errors"] += 1
                if sock is not None:
                    sock.close()
                sock = None
                continue
            mine.append((time.monotonic() - t0) * 1000)
            if not 200 <= status < 400:
                with lock:
                    counts["non2xx"] += 1
            if closes:
                sock.close()
                sock = None
        if sock is not None:
            sock.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration + timeout + 5)
    elapsed = time.monotonic() - start
    merged = sorted(x for mine in latencies for x in mine)

    def pct(p: float) -> float:
        if not merged:
            return float("nan")
        return merged[max(0, math.ceil(p / 100 * len(merged)) - 1)]

    return {
        "tool": "python",
        "rps": len(merged) / elapsed,
        "requests": len(merged),
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        **counts,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bounded HTTP GET load (loopback only)")
    parser.add_argument("url")
    parser.add_argument("-c", "--connections", type=int, default=8)
    parser.add_argument("-d", "--duration", type=float, default=3.0)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    check_loopback(args.url)
    if not 1 <= args.connections <= 512 or not 0 < args.duration <= 600:
        parser.error("connections must be 1..512 and duration 0..600 s")
    print(json.dumps(python_load(args.url, args.connections, args.duration, args.timeout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
