"""Abort storm: check that an HTTP app survives clients that hang up mid-request.

The storm runs five steps against one URL of *your* running server (any HTTP/1.1
server, not only one using flask-reqconn):

1. **normal** load: ``normal_count`` GETs, ``normal_concurrency`` at a time;
2. **abort** load: ``abort_count`` requests that the client drops on purpose, mixing the
   styles in :data:`ABORT_STYLES` (send then close at once; close after ``abort_delay``;
   close with a TCP reset; read the first chunk of ``stream_path`` then drop it);
3. **drain**: a pause for in-flight work, or, with a leak oracle, polling it until nothing
   is checked out (or ``drain_timeout`` passes);
4. **health**: one GET of ``health_path`` (default: the URL) that must answer 2xx within
   ``health_timeout``;
5. **final** load: ``final_count`` GETs that must all answer 2xx.

A leak oracle is optional: ``stats_url`` (a JSON endpoint with an integer
``checked_out``, such as the one flask-reqconn exposes) and/or ``dsn`` +
``application_name`` (sessions of that ``application_name`` in ``pg_stat_activity`` whose
``state`` is not ``'idle'``). With one, the verdict also requires zero after the drain and
again after the final load.

It is a load generator, so it refuses targets that do not resolve to loopback unless told
otherwise, and every phase is bounded in requests and the whole run in time.

Command line::

    python -m flask_reqconn.storm http://127.0.0.1:8000/items --stats-url /reqconn/stats

From Python::

    result = run_storm(StormConfig("http://127.0.0.1:8000/items", abort_count=1000))
    print(format_report(result))
    assert result.ok, result.verdict

.. versionadded:: 0.1
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import ipaddress
import json
import logging
import math
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TextIO
from urllib.parse import urljoin, urlsplit

if TYPE_CHECKING:
    import click
    import psycopg

__all__ = [
    "ABORT_STYLES",
    "MAX_CONCURRENCY",
    "MAX_REQUESTS_PER_PHASE",
    "MAX_SECONDS",
    "LeakReading",
    "PhaseResult",
    "Progress",
    "StormConfig",
    "StormError",
    "StormResult",
    "format_report",
    "main",
    "make_storm_command",
    "run_storm",
]

logger = logging.getLogger(__name__)

#: Abort styles: ``close`` (send the request, close at once), ``delay`` (close after
#: ``abort_delay``), ``rst`` (close with ``SO_LINGER`` 0, so the peer gets a TCP reset) and
#: ``stream`` (GET ``stream_path``, read the first body bytes, drop the connection).
ABORT_STYLES = ("close", "delay", "rst", "stream")

#: Hard cap on the requests of one phase.
MAX_REQUESTS_PER_PHASE = 100_000
#: Hard cap on the client threads of one phase.
MAX_CONCURRENCY = 512
#: Hard cap on ``max_seconds``.
MAX_SECONDS = 3600.0

_MAX_HEAD_BYTES = 64 * 1024
_MAX_STATS_BYTES = 1024 * 1024
_POLL_INTERVAL = 0.1
_USER_AGENT = "flask-reqconn-storm"


class StormError(ValueError):
    """The storm cannot run as configured: a bad or remote target, an unreadable oracle.

    Raised by :func:`run_storm` before any load is sent; ``main()`` exits with status 2.

    .. versionadded:: 0.1
    """


# --------------------------------------------------------------------------------------
# Configuration and results
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StormConfig:
    """Every knob of a storm. Paths (``health_path``, ``stream_path``, ``stats_url``) may be
    absolute URLs or paths resolved against ``url``.

    :raises ValueError: on out-of-range values or inconsistent options.

    .. versionadded:: 0.1
    """

    url: str
    normal_count: int = 200
    normal_concurrency: int = 16
    normal_timeout: float = 10.0
    abort_count: int = 500
    abort_concurrency: int = 32
    #: Styles to mix, round-robin; empty means ``close``, ``delay``, ``rst`` and, if
    #: ``stream_path`` is set, ``stream``.
    abort_styles: tuple[str, ...] = ()
    abort_delay: float = 0.001
    abort_timeout: float = 5.0
    stream_path: str | None = None
    drain_pause: float = 1.0
    drain_timeout: float = 10.0
    health_path: str | None = None
    health_timeout: float = 5.0
    final_count: int = 100
    final_concurrency: int = 16
    final_timeout: float = 10.0
    stats_url: str | None = None
    stats_key: str = "checked_out"
    dsn: str | None = field(default=None, repr=False)
    application_name: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    max_seconds: float = 300.0
    allow_remote: bool = False

    def __post_init__(self) -> None:
        for name in ("normal_count", "abort_count", "final_count"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_REQUESTS_PER_PHASE:
                raise ValueError(f"{name} must be 0..{MAX_REQUESTS_PER_PHASE}, got {value}")
        for name in ("normal_concurrency", "abort_concurrency", "final_concurrency"):
            value = getattr(self, name)
            if not 1 <= value <= MAX_CONCURRENCY:
                raise ValueError(f"{name} must be 1..{MAX_CONCURRENCY}, got {value}")
        for name in (
            "normal_timeout", "abort_timeout", "health_timeout", "final_timeout",
            "drain_timeout", "max_seconds",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        for name in ("abort_delay", "drain_pause"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be >= 0 seconds, got {value}")
        if self.max_seconds > MAX_SECONDS:
            raise ValueError(f"max_seconds is capped at {MAX_SECONDS:g}, got {self.max_seconds}")
        for style in self.abort_styles:
            if style not in ABORT_STYLES:
                raise ValueError(
                    f"unknown abort style {style!r}; choose from {', '.join(ABORT_STYLES)}"
                )
        if "stream" in self.abort_styles and not self.stream_path:
            raise ValueError("abort style 'stream' needs stream_path (--stream-path)")
        if (self.dsn is None) != (self.application_name is None):
            raise ValueError(
                "the pg_stat_activity oracle needs both dsn (--dsn) and "
                "application_name (--application-name)"
            )
        if not self.stats_key or any(not part for part in self.stats_key.split(".")):
            raise ValueError(f"stats_key must be a dotted key path, got {self.stats_key!r}")
        for name, value in self.headers:
            if not name or any(c in name + value for c in "\r\n") or ":" in name:
                raise ValueError(f"invalid header {name!r}: {value!r}")

    @property
    def effective_abort_styles(self) -> tuple[str, ...]:
        """The styles the abort phase cycles through."""
        if self.abort_styles:
            return self.abort_styles
        base = ("close", "delay", "rst")
        return (*base, "stream") if self.stream_path else base


@dataclass(frozen=True)
class Progress:
    """One progress event: ``done`` of ``total`` requests of ``phase``.

    Each phase sends one event with ``done == 0`` when it starts and one with
    ``finished=True`` at its end. ``drain`` and ``settle`` (waits, no requests) have
    ``total == 0``.

    .. versionadded:: 0.1
    """

    phase: str
    done: int
    total: int
    finished: bool = False


@dataclass
class PhaseResult:
    """What one request phase saw.

    ``requests`` counts requests started; ``skipped`` those not started because the
    ``max_seconds`` deadline passed. Socket-level failures are in ``errors`` (``timeout``,
    ``ERR:ConnectionRefused``, ...), never in ``statuses``.

    .. versionadded:: 0.1
    """

    name: str
    planned: int
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    aborted: int = 0
    styles: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    seconds: float = 0.0

    @property
    def error_count(self) -> int:
        """Requests that ended in a socket or protocol error."""
        return sum(self.errors.values())

    @property
    def ok_count(self) -> int:
        """Requests answered with a 2xx status."""
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    @property
    def all_ok(self) -> bool:
        """Every planned request was sent and answered 2xx."""
        return self.skipped == 0 and self.ok_count == self.planned


@dataclass
class LeakReading:
    """Readings of one leak oracle: before the storm, after the drain, after the final load.

    ``None`` means it could not be read; ``error`` says why (last failure).

    .. versionadded:: 0.1
    """

    source: str
    name: str
    label: str
    before: int | None = None
    after_drain: int | None = None
    at_end: int | None = None
    error: str | None = None

    @property
    def clean(self) -> bool:
        """Zero after the drain and at the end."""
        return self.after_drain == 0 and self.at_end == 0


@dataclass
class StormResult:
    """The outcome of :func:`run_storm`. ``verdict`` starts with ``OK:`` or ``FAIL:``.

    .. versionadded:: 0.1
    """

    config: StormConfig
    normal: PhaseResult
    abort: PhaseResult
    health: PhaseResult
    final: PhaseResult
    leaks: list[LeakReading]
    drain_seconds: float
    seconds: float
    deadline_hit: bool
    ok: bool
    verdict: str

    @property
    def phases(self) -> list[PhaseResult]:
        """The request phases in the order they ran."""
        return [self.normal, self.abort, self.health, self.final]


# --------------------------------------------------------------------------------------
# Targets and the loopback guard
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    url: str
    family: int
    sockaddr: tuple[Any, ...]
    host_header: str
    path: str


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _resolve(url: str, *, allow_remote: bool, what: str) -> _Target:
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
        remote = sorted({str(info[4][0]) for info in infos if not _is_loopback(str(info[4][0]))})
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
    return _Target(url, family, tuple(sockaddr), parts.netloc.rpartition("@")[2], path)


def _request_bytes(target: _Target, headers: Sequence[tuple[str, str]]) -> bytes:
    lines = [
        f"GET {target.path} HTTP/1.1",
        f"Host: {target.host_header}",
        f"User-Agent: {_USER_AGENT}",
        "Accept: */*",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
        "",
        "",
    ]
    return "\r\n".join(lines).encode("latin-1")


# --------------------------------------------------------------------------------------
# A minimal HTTP/1.1 client on raw sockets
# --------------------------------------------------------------------------------------


class _ProtocolError(Exception):
    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


def _connect(target: _Target, deadline: float) -> socket.socket:
    sock = socket.socket(target.family, socket.SOCK_STREAM)
    try:
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
                raise _ProtocolError("BadResponse", "header or chunk line too long")
            start = max(0, len(self.buf) - len(marker) + 1)
            if not self.fill():
                raise _ProtocolError("IncompleteResponse", "closed mid-response")

    def take(self, size: int, keep: bytearray | None) -> None:
        while len(self.buf) < size:
            if keep is None and self.buf:
                size -= len(self.buf)
                self.buf.clear()
            if not self.fill():
                raise _ProtocolError("IncompleteResponse", "closed before end of body")
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
            raise _ProtocolError("BadResponse", f"status line {status_line[:80]!r}")
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
                raise _ProtocolError("BadResponse", f"chunk size {line[:40]!r}") from None
            if size == 0:
                while reader.read_until(b"\r\n", _MAX_HEAD_BYTES):
                    pass  # trailers, up to the empty line
                return
            reader.take(size, keep)
            if reader.read_until(b"\r\n", 2):
                raise _ProtocolError("BadResponse", "chunk not followed by CRLF")
    elif "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise _ProtocolError("BadResponse", "bad Content-Length") from None
        reader.take(length, keep)
    else:
        reader.take_all(keep)


def _http_get(
    target: _Target, request: bytes, deadline: float, keep: bytearray | None = None
) -> int:
    with _connect(target, deadline) as sock:
        sock.settimeout(_remaining(deadline))
        sock.sendall(request)
        reader = _Reader(sock, deadline)
        status, headers = _read_head(reader)
        _read_body(reader, status, headers, keep)
        if keep is not None and len(keep) > _MAX_STATS_BYTES:
            raise _ProtocolError("BadResponse", "body too large")
    return status


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, _ProtocolError):
        return f"ERR:{exc.kind}"
    name = type(exc).__name__
    if type(exc) is OSError and isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
    return "ERR:" + name.removesuffix("Error")


@dataclass
class _Outcome:
    latency_ms: float
    status: int | None = None
    error: str | None = None
    aborted: bool = False
    style: str | None = None


def _timed_get(target: _Target, request: bytes, timeout: float, deadline: float) -> _Outcome:
    start = time.monotonic()
    try:
        status = _http_get(target, request, min(start + timeout, deadline))
    except (OSError, _ProtocolError) as exc:
        return _Outcome((time.monotonic() - start) * 1000, error=_error_name(exc))
    return _Outcome((time.monotonic() - start) * 1000, status=status)


_LINGER_RESET = struct.pack("ii", 1, 0)


def _aborted_request(
    target: _Target, request: bytes, style: str, delay: float, deadline: float
) -> _Outcome:
    start = time.monotonic()
    status: int | None = None
    try:
        with _connect(target, deadline) as sock:
            sock.settimeout(_remaining(deadline))
            sock.sendall(request)
            if style == "delay":
                time.sleep(delay)
            elif style == "rst":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            elif style == "stream":
                reader = _Reader(sock, deadline)
                status, _headers = _read_head(reader)
                if not reader.buf:
                    reader.fill()  # the first body bytes, or EOF for an empty body
    except (OSError, _ProtocolError) as exc:
        return _Outcome(
            (time.monotonic() - start) * 1000, status, _error_name(exc), style=style
        )
    return _Outcome((time.monotonic() - start) * 1000, status, aborted=True, style=style)


# --------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------


ProgressCallback = Callable[[Progress], None]


def _percentile(ordered: Sequence[float], pct: float) -> float | None:
    if not ordered:
        return None
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return round(ordered[rank - 1], 3)


def _run_phase(
    name: str,
    planned: int,
    concurrency: int,
    job: Callable[[int, float], _Outcome],
    deadline: float,
    progress: ProgressCallback | None,
) -> PhaseResult:
    """Run ``job(index, deadline)`` ``planned`` times on ``concurrency`` threads."""
    result = PhaseResult(name=name, planned=planned)
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    styles: Counter[str] = Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()
    failures: list[BaseException] = []
    started = 0
    done = 0

    def emit(event: Progress) -> None:
        if progress is not None:
            progress(event)

    def worker() -> None:
        nonlocal started, done
        try:
            while not stop.is_set():
                with lock:
                    if started >= planned or time.monotonic() >= deadline:
                        return
                    index = started
                    started += 1
                outcome = job(index, deadline)
                with lock:
                    done += 1
                    latencies.append(outcome.latency_ms)
                    if outcome.status is not None:
                        statuses[outcome.status] += 1
                    if outcome.error is not None:
                        errors[outcome.error] += 1
                    if outcome.aborted:
                        result.aborted += 1
                    if outcome.style is not None:
                        styles[outcome.style] += 1
                    emit(Progress(name, done, planned))
        except BaseException as exc:  # re-raised in the calling thread
            with lock:
                failures.append(exc)
            stop.set()

    begin = time.monotonic()
    emit(Progress(name, 0, planned))
    threads = [
        threading.Thread(target=worker, name=f"storm-{name}-{i}", daemon=True)
        for i in range(min(concurrency, planned))
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        stop.set()
    if failures:
        raise failures[0]
    latencies.sort()
    result.requests = started
    result.skipped = planned - started
    result.statuses = dict(sorted(statuses.items()))
    result.errors = dict(sorted(errors.items()))
    result.styles = dict(styles)
    result.p50_ms = _percentile(latencies, 50)
    result.p99_ms = _percentile(latencies, 99)
    result.max_ms = _percentile(latencies, 100)
    result.seconds = round(time.monotonic() - begin, 3)
    emit(Progress(name, done, planned, finished=True))
    return result


# --------------------------------------------------------------------------------------
# Leak oracles
# --------------------------------------------------------------------------------------


class _Oracle(Protocol):
    source: str
    name: str
    label: str

    def read(self) -> int: ...

    def close(self) -> None: ...


_MISSING = object()


def _lookup(data: object, path: Sequence[str]) -> object:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return _MISSING
        data = data[key]
    return data


def _checked_out_from_json(data: object, key: str) -> int:
    """The integer at dotted ``key``; for a plain key, fall back to the sum over
    ``data["pools"][*][key]``."""
    path = key.split(".")
    value = _lookup(data, path)
    if value is _MISSING and len(path) == 1 and isinstance(data, dict):
        pools = data.get("pools")
        if isinstance(pools, dict) and pools:
            values = [_lookup(pool, path) for pool in pools.values()]
            if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                return sum(v for v in values if isinstance(v, int))
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"no integer at key {key!r} in the stats JSON (set --stats-key)")


class _StatsOracle:
    source = "stats"

    def __init__(self, target: _Target, key: str, headers: Sequence[tuple[str, str]],
                 timeout: float) -> None:
        self.target = target
        self.key = key
        self.request = _request_bytes(target, headers)
        self.timeout = timeout
        self.name = key
        self.label = f"{key} at {target.url}"

    def read(self) -> int:
        body = bytearray()
        status = _http_get(self.target, self.request, time.monotonic() + self.timeout, body)
        if not 200 <= status < 300:
            raise ValueError(f"stats URL answered {status}")
        return _checked_out_from_json(json.loads(bytes(body)), self.key)

    def close(self) -> None:
        pass


_PG_QUERY = """
SELECT count(*) FILTER (WHERE state <> 'idle'), count(*) FILTER (WHERE state IS NULL)
FROM pg_stat_activity
WHERE application_name = %s AND pid <> pg_backend_pid()
"""


class _PgOracle:
    source = "pg"

    def __init__(self, dsn: str, application_name: str, timeout: float) -> None:
        self.dsn = dsn
        self.application_name = application_name
        self.timeout = timeout
        self.name = "non-idle sessions"
        self.label = f"non-idle sessions of application_name {application_name!r}"
        self.conn: psycopg.Connection[Any] | None = None

    def read(self) -> int:
        import psycopg

        if self.conn is None or self.conn.closed:
            self.conn = psycopg.connect(
                self.dsn,
                autocommit=True,
                application_name=_USER_AGENT,
                connect_timeout=max(1, math.ceil(self.timeout)),
            )
        row = self.conn.execute(_PG_QUERY, (self.application_name,)).fetchone()
        busy, hidden = (int(row[0]), int(row[1])) if row else (0, 0)
        if hidden:
            raise PermissionError(
                f"{hidden} session(s) of {self.application_name!r} hide their state from this "
                "role: connect as the app's role or a member of pg_read_all_stats"
            )
        return busy

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _read_oracles(
    oracles: Sequence[_Oracle], readings: Sequence[LeakReading]
) -> list[int | None]:
    values: list[int | None] = []
    for oracle, reading in zip(oracles, readings, strict=True):
        try:
            values.append(oracle.read())
        except Exception as exc:  # an oracle failure is a finding, not a crash
            logger.debug("leak oracle %s failed: %r", oracle.label, exc)
            reading.error = f"{type(exc).__name__}: {exc}"
            values.append(None)
    return values


def _settle(
    oracles: Sequence[_Oracle],
    readings: Sequence[LeakReading],
    timeout: float,
    deadline: float,
) -> list[int | None]:
    """Poll until every oracle reads 0 twice in a row, or the time is up."""
    end = min(time.monotonic() + timeout, deadline)
    zeros = 0
    while True:
        values = _read_oracles(oracles, readings)
        zeros = zeros + 1 if all(v == 0 for v in values) else 0
        now = time.monotonic()
        if zeros >= 2 or now >= end:
            return values
        time.sleep(min(_POLL_INTERVAL, end - now))


# --------------------------------------------------------------------------------------
# The storm
# --------------------------------------------------------------------------------------


def run_storm(config: StormConfig, progress: ProgressCallback | None = None) -> StormResult:
    """Run the five phases of a storm against ``config.url`` and judge the outcome.

    Every target is resolved (and checked to be loopback unless ``allow_remote``) and the
    leak oracles are read once before any load is sent.

    :param config: what to send, where, and how much.
    :param progress: called with a :class:`Progress` when each phase starts, after each
        request (from client threads, one call at a time) and when each phase finishes.
    :raises StormError: for a refused or unusable target or an unreadable oracle.

    .. versionadded:: 0.1
    """
    begin = time.monotonic()
    deadline = begin + config.max_seconds

    def resolve(url: str, what: str) -> _Target:
        return _resolve(urljoin(config.url, url), allow_remote=config.allow_remote, what=what)

    main_target = resolve(config.url, "target")
    health_target = resolve(config.health_path or config.url, "health URL")
    stream_target = resolve(config.stream_path, "stream URL") if config.stream_path else None
    oracles: list[_Oracle] = []
    if config.stats_url:
        stats_target = resolve(config.stats_url, "stats URL")
        oracles.append(
            _StatsOracle(stats_target, config.stats_key, config.headers, config.health_timeout)
        )
    if config.dsn is not None and config.application_name is not None:
        oracles.append(_PgOracle(config.dsn, config.application_name, config.health_timeout))

    readings = [LeakReading(oracle.source, oracle.name, oracle.label) for oracle in oracles]
    try:
        for oracle, reading, value in zip(
            oracles, readings, _read_oracles(oracles, readings), strict=True
        ):
            if value is None:
                raise StormError(f"cannot read the leak oracle ({oracle.label}): {reading.error}")
            reading.before = value
            reading.error = None

        request = _request_bytes(main_target, config.headers)
        normal = _run_phase(
            "normal", config.normal_count, config.normal_concurrency,
            lambda _i, dl: _timed_get(main_target, request, config.normal_timeout, dl),
            deadline, progress,
        )

        styles = config.effective_abort_styles
        stream_request = _request_bytes(stream_target, config.headers) if stream_target else b""

        def abort_job(index: int, dl: float) -> _Outcome:
            style = styles[index % len(styles)]
            own_deadline = min(time.monotonic() + config.abort_timeout, dl)
            if style == "stream" and stream_target is not None:
                return _aborted_request(stream_target, stream_request, style, 0, own_deadline)
            return _aborted_request(main_target, request, style, config.abort_delay, own_deadline)

        abort = _run_phase(
            "abort", config.abort_count, config.abort_concurrency, abort_job, deadline, progress
        )

        drain_begin = time.monotonic()
        if progress is not None:
            progress(Progress("drain", 0, 0))
        if oracles:
            values = _settle(oracles, readings, config.drain_timeout, deadline)
            for reading, value in zip(readings, values, strict=True):
                reading.after_drain = value
        else:
            time.sleep(max(0.0, min(config.drain_pause, deadline - time.monotonic())))
        drain_seconds = round(time.monotonic() - drain_begin, 3)
        if progress is not None:
            progress(Progress("drain", 0, 0, finished=True))

        health_request = _request_bytes(health_target, config.headers)
        health = _run_phase(
            "health", 1, 1,
            lambda _i, dl: _timed_get(health_target, health_request, config.health_timeout, dl),
            deadline, progress,
        )
        final = _run_phase(
            "final", config.final_count, config.final_concurrency,
            lambda _i, dl: _timed_get(main_target, request, config.final_timeout, dl),
            deadline, progress,
        )

        if oracles:
            if progress is not None:
                progress(Progress("settle", 0, 0))
            values = _settle(oracles, readings, config.drain_timeout, deadline)
            for reading, value in zip(readings, values, strict=True):
                reading.at_end = value
            if progress is not None:
                progress(Progress("settle", 0, 0, finished=True))
    finally:
        for oracle in oracles:
            try:
                oracle.close()
            except Exception:  # closing a stats reader or a PG session must not mask results
                logger.debug("closing leak oracle %s failed", oracle.label, exc_info=True)

    deadline_hit = any(phase.skipped for phase in (normal, abort, health, final))
    ok, verdict = _judge(config, health, final, readings, deadline_hit)
    return StormResult(
        config=config, normal=normal, abort=abort, health=health, final=final,
        leaks=readings, drain_seconds=drain_seconds,
        seconds=round(time.monotonic() - begin, 3), deadline_hit=deadline_hit,
        ok=ok, verdict=verdict,
    )


def _counts(counts: dict[Any, int]) -> str:
    return " ".join(f"{key}:{n}" for key, n in counts.items())


def _judge(
    config: StormConfig,
    health: PhaseResult,
    final: PhaseResult,
    readings: Sequence[LeakReading],
    deadline_hit: bool,
) -> tuple[bool, str]:
    problems: list[str] = []
    if deadline_hit:
        problems.append(f"stopped by the {config.max_seconds:g} s deadline (--max-seconds)")
    if health.ok_count != 1:
        seen = _counts(health.statuses) or _counts(health.errors) or "not sent"
        problems.append(f"health check failed ({seen}, timeout {config.health_timeout:g} s)")
    if not final.all_ok:
        bad: dict[Any, int] = {k: v for k, v in final.statuses.items() if not 200 <= k < 300}
        bad.update(final.errors)
        detail = f" ({_counts(bad)})" if bad else ""
        problems.append(f"final load {final.ok_count}/{final.planned} 2xx{detail}")
    for reading in readings:
        if reading.after_drain != 0:
            problems.append(f"{reading.name} = {_fmt(reading.after_drain)} after the drain")
        if reading.at_end != 0:
            problems.append(f"{reading.name} = {_fmt(reading.at_end)} after the final load")
        if reading.error and not reading.clean:
            problems.append(f"{reading.source} oracle error: {reading.error}")
    app_failed = health.ok_count != 1 or not final.all_ok
    if app_failed and readings and all(r.source == "pg" and r.clean for r in readings):
        problems.append(
            "pg_stat_activity shows no busy session, yet the app failed: a connection the"
            " app lost is closed by the garbage collector and leaves pg_stat_activity while"
            " the pool still counts it; add --stats-url to read the pool's own count"
        )
    if problems:
        return False, "FAIL: " + "; ".join(problems)
    parts = [
        f"health {next(iter(health.statuses), '?')} in {_fmt(health.p50_ms)} ms",
        f"final {final.ok_count}/{final.planned} 2xx",
    ]
    if readings:
        parts.extend(f"{reading.name} 0 after drain and at end" for reading in readings)
    else:
        parts.append("no leak oracle (add --stats-url or --dsn/--application-name)")
    return True, "OK: " + "; ".join(parts)


def _fmt(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def format_report(result: StormResult) -> str:
    """A compact table (phase, requests, statuses, errors, p50/p99) and the verdict last.

    .. versionadded:: 0.1
    """
    header = ("phase", "requests", "statuses", "errors", "p50 ms", "p99 ms")
    rows = [header]
    for phase in result.phases:
        statuses = _counts(phase.statuses)
        if phase.aborted:
            statuses = f"aborted:{phase.aborted} {statuses}".strip()
        requests = str(phase.requests)
        if phase.skipped:
            requests += f" (+{phase.skipped} skipped)"
        rows.append((
            phase.name, requests, statuses or "-", _counts(phase.errors) or "-",
            _fmt(phase.p50_ms), _fmt(phase.p99_ms),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = {1, 4, 5}
    lines = [
        "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in rows
    ]
    if result.abort.styles:
        lines.append(f"abort styles: {_counts(result.abort.styles)}")
    lines.append(f"drain: {result.drain_seconds:.1f} s; total {result.seconds:.1f} s")
    for reading in result.leaks:
        line = (
            f"leak oracle {reading.label}: before {_fmt(reading.before)}, "
            f"after drain {_fmt(reading.after_drain)}, at end {_fmt(reading.at_end)}"
        )
        if reading.error and not reading.clean:
            line += f" ({reading.error})"
        lines.append(line)
    lines.append(f"verdict: {result.verdict}")
    return "\n".join(lines)


def _result_json(result: StormResult) -> dict[str, Any]:
    data = dataclasses.asdict(result)
    if data["config"].get("dsn"):
        data["config"]["dsn"] = "<hidden>"
    data["config"]["headers"] = [[name, "<hidden>"] for name, _ in result.config.headers]
    return data


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


class _ProgressPrinter:
    """A bar per phase on a terminal; otherwise one line per phase start and finish."""

    def __init__(self, stream: TextIO, tty: bool) -> None:
        self.stream = stream
        self.tty = tty
        self.last_draw = 0.0
        self.phase_began: dict[str, float] = {}

    def __call__(self, event: Progress) -> None:
        now = time.monotonic()
        if event.done == 0 and not event.finished:
            self.phase_began[event.phase] = now
        elapsed = now - self.phase_began.get(event.phase, now)
        count = f"{event.done}/{event.total}" if event.total else ""
        if not self.tty:
            if event.finished:
                line = f"storm: {event.phase} finished {count} in {elapsed:.1f} s"
            elif event.done == 0:
                line = f"storm: {event.phase} started"
                if event.total:
                    line += f" ({event.total} request{'s' if event.total != 1 else ''})"
            else:
                return
            self.stream.write(" ".join(line.split()) + "\n")
            self.stream.flush()
            return
        if not event.finished and event.done and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        width = 30
        filled = width * event.done // event.total if event.total else 0
        bar = ("#" * filled + "." * (width - filled)) if event.total else " " * width
        end = f" {elapsed:.1f} s\n" if event.finished else ""
        self.stream.write(f"\r{event.phase:<7}[{bar}] {count}{end}")
        self.stream.flush()


# (group, config field, type or None for a string, help): the one definition of the
# options, used by the argparse parser, which the click command hands its arguments to.
_OPTIONS: tuple[tuple[str, str, type[int] | type[float] | None, str], ...] = (
    ("normal load", "normal_count", int, "requests"),
    ("normal load", "normal_concurrency", int, "client threads"),
    ("normal load", "normal_timeout", float, "seconds per request"),
    ("aborted load", "abort_count", int, "requests the client drops"),
    ("aborted load", "abort_concurrency", int, "client threads"),
    ("aborted load", "abort_timeout", float, "seconds per abort (connect, send, first chunk)"),
    ("aborted load", "abort_delay", float, "seconds before closing in the 'delay' style"),
    ("aborted load", "stream_path", None, "streamed URL or path for the 'stream' style"),
    ("drain", "drain_pause", float, "seconds to wait after the aborts without a leak oracle"),
    ("drain", "drain_timeout", float, "longest wait for the oracle to read 0 (twice)"),
    ("health check", "health_path", None, "URL or path (default: the target URL)"),
    ("health check", "health_timeout", float, "seconds it may take"),
    ("final load (must be all 2xx)", "final_count", int, "requests"),
    ("final load (must be all 2xx)", "final_concurrency", int, "client threads"),
    ("final load (must be all 2xx)", "final_timeout", float, "seconds per request"),
    ("leak oracle", "stats_url", None, "URL or path of a JSON stats endpoint"),
    ("leak oracle", "stats_key", None, "dotted key of the checked-out count"),
    ("leak oracle", "dsn", None, "PostgreSQL conninfo (password via PGPASSWORD or .pgpass)"),
    ("leak oracle", "application_name", None, "application_name of the app's sessions"),
    ("limits", "max_seconds", float, f"deadline for the whole storm (at most {MAX_SECONDS:g})"),
)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(StormConfig)}


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def _styles(text: str) -> tuple[str, ...]:
    styles = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in styles if s not in ABORT_STYLES]
    if unknown or not styles:
        raise argparse.ArgumentTypeError(
            f"choose a comma-separated subset of {','.join(ABORT_STYLES)}"
        )
    return styles


def _build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m flask_reqconn.storm",
        description=(
            "Send normal load, then aborted load, then check that the app still answers: "
            "a health check and a final load that must all be 2xx, and, with a leak oracle, "
            "zero connections left checked out. Exit status: 0 ok, 1 failed, 2 usage error."
        ),
    )
    parser.add_argument("url", help="http:// URL of your running app (loopback only)")
    groups = {title: parser.add_argument_group(title) for title, *_ in _OPTIONS}
    for title, name, kind, help_text in _OPTIONS:
        default = _DEFAULTS[name]
        if default is not None:
            help_text += f" (default: {default})"
        if kind is None:
            metavar = name.rsplit("_", 1)[-1].upper()
        else:
            metavar = "N" if kind is int else "SECONDS"
        groups[title].add_argument(
            "--" + name.replace("_", "-"), type=kind or str, default=default, help=help_text,
            metavar=metavar,
        )
        if name == "abort_delay":
            groups[title].add_argument(
                "--abort-styles", type=_styles, default=(), metavar="STYLES",
                help=f"comma-separated subset of {','.join(ABORT_STYLES)} "
                "(default: all that apply)",
            )
    other = parser.add_argument_group("requests and output")
    other.add_argument(
        "-H", "--header", dest="headers", type=_header, action="append", default=[],
        metavar="'NAME: VALUE'", help="extra request header (repeatable)",
    )
    other.add_argument(
        "--allow-remote", action="store_true",
        help="allow a target that is not loopback (only for servers you operate)",
    )
    other.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    other.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _config_from_args(ns: argparse.Namespace) -> StormConfig:
    names = {f.name for f in dataclasses.fields(StormConfig)}
    values = {name: getattr(ns, name) for name in names if name != "headers"}
    return StormConfig(**values, headers=tuple(ns.headers))


def _exit_status(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 2


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Command-line entry point: ``python -m flask_reqconn.storm URL [options]``.

    :param argv: arguments without the program name (default: ``sys.argv[1:]``).
    :param prog: program name shown in help and errors.
    :return: 0 if the verdict is ok, 1 if not, 2 for usage errors (130 if interrupted).

    .. versionadded:: 0.1
    """
    parser = _build_parser(prog)
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:
        return _exit_status(exc)
    try:
        config = _config_from_args(ns)
    except ValueError as exc:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    progress = None if ns.quiet else _ProgressPrinter(sys.stderr, sys.stderr.isatty())
    try:
        result = run_storm(config, progress=progress)
    except StormError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    if ns.json:
        print(json.dumps(_result_json(result), indent=2))
    else:
        print(format_report(result))
    return 0 if result.ok else 1


def make_storm_command() -> click.Command:
    """A click command running :func:`main`, for ``flask reqconn storm URL [options]``.

    It hands its arguments to the same parser as ``python -m flask_reqconn.storm``, so the
    options, help and exit statuses are identical.

    .. versionadded:: 0.1
    """
    import click

    @click.command(
        "storm",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        add_help_option=False,
        short_help="Abort storm: check the app survives clients that hang up.",
        help="Abort storm against a running app; see 'storm --help' for options.",
    )
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    @click.pass_context
    def storm_command(ctx: click.Context, args: tuple[str, ...]) -> None:
        ctx.exit(main(list(args), prog=ctx.command_path))

    return storm_command


if __name__ == "__main__":
    raise SystemExit(main())
