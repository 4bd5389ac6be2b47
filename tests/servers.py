"""Real WSGI server subprocesses for end-to-end tests, and a raw-socket HTTP client.

Every server runs in its own session (so its process group id is its PID), writes stdout
and stderr to a log file, and is stopped by PID: SIGTERM, then SIGKILL to the whole group,
then a check through /proc that the server and every child it was seen with are gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent

STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

# --------------------------------------------------------------------------------------
# Processes, through /proc
# --------------------------------------------------------------------------------------


def _read_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgrp, starttime) of ``pid``, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(b")") + 2 :].split()
    state = rest[0].decode()
    ppid, pgrp = int(rest[1]), int(rest[2])
    starttime = int(rest[19])
    return state, ppid, pgrp, starttime


def _proc_table() -> dict[int, tuple[str, int, int, int]]:
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _read_stat(int(name))
            if st is not None:
                table[int(name)] = st
    return table


def pid_alive(pid: int, starttime: int | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, if given, started at ``starttime``."""
    st = _read_stat(pid)
    if st is None:
        return False
    if st[0] in ("Z", "X"):
        return False
    return starttime is None or st[3] == starttime


def descendants(pid: int) -> dict[int, int]:
    """Living descendants of ``pid``: {pid: starttime}."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for p, (_state, ppid, _pgrp, _start) in table.items():
        children.setdefault(ppid, []).append(p)
    found: dict[int, int] = {}
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        if p in found or table[p][0] in ("Z", "X"):
            continue
        found[p] = table[p][3]
        todo.extend(children.get(p, []))
    return found


def group_members(pgid: int) -> dict[int, int]:
    """Living processes in process group ``pgid``: {pid: starttime}."""
    return {
        p: st[3] for p, st in _proc_table().items() if st[2] == pgid and st[0] not in ("Z", "X")
    }


# --------------------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------------------

_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (not handed out before by this process)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port found")


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------
# A server process
# --------------------------------------------------------------------------------------


class ServerError(AssertionError):
    """A server did not start, or did not stop cleanly."""


class ServerProcess:
    """A server subprocess listening on 127.0.0.1:``port``.

    Started with ``start()`` (or as a context manager; constructors below start it unless
    ``start=False``). Ready means: 127.0.0.1:``port`` accepts TCP connections, at least
    ``min_workers`` child processes exist, and ``ready(self)`` (if given) is true.
    """

    def __init__(
        self,
        cmd: Sequence[str],
        port: int,
        *,
        env: Mapping[str, str | None] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        name: str = "server",
        startup_timeout: float = STARTUP_TIMEOUT,
        min_workers: int = 0,
        ready: Callable[[ServerProcess], bool] | None = None,
    ) -> None:
        self.cmd = [str(c) for c in cmd]
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.name = name
        self.cwd = Path(cwd) if cwd is not None else REPO_ROOT
        self.startup_timeout = startup_timeout
        self.min_workers = min_workers
        self.ready = ready
        self.env = _child_env(env)
        log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="srv-"))
        self.log_path = log_dir / f"{name}-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._start_time: int | None = None
        self._seen: dict[int, int] = {}  # every descendant ever seen: pid -> starttime
        self._stopped = False

    def __repr__(self) -> str:
        state = "not started" if self.proc is None else f"pid {self.proc.pid}"
        return f"<ServerProcess {self.name} {self.url} {state}>"

    # -- starting ----------------------------------------------------------------------

    def start(self) -> ServerProcess:
        if self.proc is not None:
            raise RuntimeError(f"{self!r} already started")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        st = _read_stat(self.proc.pid)
        self._start_time = st[3] if st else None
        try:
            self._wait_ready()
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        listening = False
        while True:
            if self.proc.poll() is not None:
                raise ServerError(
                    f"{self.name} exited with status {self.proc.returncode} before it was "
                    f"ready\ncommand: {' '.join(self.cmd)}\n{self.log_tail()}"
                )
            listening = listening or _accepts(self.port)
            if (
                listening
                and len(self.worker_pids()) >= self.min_workers
                and (self.ready is None or self.ready(self))
            ):
                return
            if time.monotonic() >= deadline:
                what = "listening" if not listening else f"ready ({self.min_workers} worker(s))"
                raise ServerError(
                    f"{self.name} not {what} on port {self.port} after "
                    f"{self.startup_timeout:g}s\ncommand: {' '.join(self.cmd)}\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def __enter__(self) -> ServerProcess:
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- looking -----------------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self!r} not started")
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 4000) -> str:
        text = self.log_text()
        head = (
            f"--- last {chars} chars of {self.log_path} ---\n"
            if len(text) > chars
            else f"--- {self.log_path} ---\n"
        )
        return head + text[-chars:]

    def children(self) -> list[int]:
        """All living descendants of the server (and remember them for ``stop``)."""
        if not self.is_running():
            return []
        found = descendants(self.pid)
        self._seen.update(found)
        return sorted(found)

    def worker_pids(self) -> list[int]:
        """Living direct children of the server: gunicorn's workers."""
        if not self.is_running():
            return []
        found = descendants(self.pid)
        self._seen.update(found)
        return sorted(p for p in found if (_read_stat(p) or ("", 0, 0, 0))[1] == self.pid)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the server process (not its group)."""
        if not self.is_running():
            raise RuntimeError(f"{self!r} is not running")
        os.kill(self.pid, sig)

    # -- stopping ----------------------------------------------------------------------

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait ``timeout``, SIGKILL the group; check everything is gone.

        Returns the server's exit status. Raises ``ServerError`` if any process of the
        server is left. Calling it again is harmless.
        """
        if self.proc is None or self._stopped:
            return self.returncode
        self._stopped = True
        proc = self.proc
        pgid = proc.pid  # start_new_session: the group id is the PID
        if proc.poll() is None:
            self._seen.update(descendants(proc.pid))
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._seen.update(descendants(proc.pid))
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
                proc.wait(10)
        # Workers may outlive a master that died or was killed: finish the group off.
        leftovers = self._leftovers(pgid)
        if leftovers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            for pid, start in leftovers.items():
                if pid_alive(pid, start):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while leftovers and time.monotonic() < deadline:
                time.sleep(0.05)
                leftovers = self._leftovers(pgid)
        if leftovers:
            raise ServerError(f"{self.name} (pid {pgid}) left processes behind: {leftovers}")
        if pid_alive(pgid, self._start_time):
            raise ServerError(f"{self.name} pid {pgid} still alive after stop")
        return proc.returncode

    def _leftovers(self, pgid: int) -> dict[int, int]:
        left = {p: s for p, s in self._seen.items() if pid_alive(p, s)}
        left.update(group_members(pgid))
        return left


def _child_env(extra: Mapping[str, str | None] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    paths = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


# --------------------------------------------------------------------------------------
# Constructors
# --------------------------------------------------------------------------------------


def _gunicorn_has_control_socket() -> bool:
    try:
        import gunicorn.config  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover
        return False
    return hasattr(gunicorn.config, "ControlSocketDisable")


# gunicorn calls post_worker_init in a worker once it has loaded the app; the line it
# prints to the log tells that this worker can serve.
_GUNICORN_READY_CONF = """\
import sys

def post_worker_init(worker):
    print(f"reqconn-tests: worker {worker.pid} ready", file=sys.stderr, flush=True)
"""


def _gunicorn_workers_ready(server: ServerProcess) -> bool:
    log = server.log_text()
    workers = server.worker_pids()
    return len(workers) >= server.min_workers and all(
        f"reqconn-tests: worker {pid} ready" in log for pid in workers
    )


def gunicorn(
    app_spec: str,
    *,
    worker_class: str = "sync",
    workers: int = 1,
    threads: int = 1,
    graceful_timeout: float = 5,
    extra_args: Iterable[str] = (),
    env: Mapping[str, str | None] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    start: bool = True,
) -> ServerProcess:
    """``python -m gunicorn`` on a free port; waits until every worker has loaded the app.

    ``threads > 1`` with the sync worker class makes gunicorn use gthread, as gunicorn does.
    ``extra_args`` come after the defaults, so they can override them. Readiness uses a
    ``post_worker_init`` hook in a config file of ours; if ``extra_args`` bring their own
    ``-c``/``--config``, start waits only for the port and the worker processes.
    """
    port = free_port()
    extra_args = list(extra_args)
    log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="srv-"))
    own_config = any(a in ("-c", "--config") or a.startswith("--config=") for a in extra_args)
    cmd = [
        sys.executable, "-m", "gunicorn",
        "--bind", f"127.0.0.1:{port}",
        "--worker-class", worker_class,
        "--workers", str(workers),
        "--graceful-timeout", f"{graceful_timeout:g}",
        "--log-level", "info",
    ]  # fmt: skip
    if threads != 1:
        cmd += ["--threads", str(threads)]
    if _gunicorn_has_control_socket():
        # gunicorn >= 25.1 otherwise binds one fixed control socket path per user.
        cmd.append("--no-control-socket")
    ready = None
    if not own_config:
        conf = log_dir / f"gunicorn-ready-{port}.conf.py"
        conf.write_text(_GUNICORN_READY_CONF)
        cmd += ["--config", str(conf)]
        ready = _gunicorn_workers_ready
    cmd += [*extra_args, app_spec]
    server = ServerProcess(
        cmd, port, env=env, cwd=cwd, log_dir=log_dir, name=f"gunicorn-{worker_class}",
        min_workers=workers, ready=ready,
    )  # fmt: skip
    return server.start() if start else server


def werkzeug_dev(
    app_spec: str,
    *,
    threaded: bool = True,
    extra_args: Iterable[str] = (),
    env: Mapping[str, str | None] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    start: bool = True,
) -> ServerProcess:
    """``flask run`` (the Werkzeug development server), no reloader, no debugger.

    ``app_spec`` is what ``flask --app`` takes: ``module:app`` or ``module:create_app``
    (a function is called).
    """
    port = free_port()
    cmd = [
        sys.executable, "-m", "flask", "--app", app_spec, "run",
        "--no-reload", "--no-debugger",
        "--with-threads" if threaded else "--without-threads",
        "--host", "127.0.0.1", "--port", str(port),
        *extra_args,
    ]  # fmt: skip
    env = {"FLASK_DEBUG": None, "FLASK_RUN_CERT": None, **(env or {})}
    server = ServerProcess(cmd, port, env=env, cwd=cwd, log_dir=log_dir, name="werkzeug")
    return server.start() if start else server


def waitress(
    app_spec: str,
    *,
    call: bool | None = None,
    threads: int = 4,
    extra_args: Iterable[str] = (),
    env: Mapping[str, str | None] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    start: bool = True,
) -> ServerProcess:
    """``python -m waitress`` (waitress-serve). ``call`` (default: the object's name starts
    with ``create_``) calls the object to get the app."""
    port = free_port()
    if call is None:
        call = app_spec.rpartition(":")[2].startswith("create_")
    cmd = [
        sys.executable, "-m", "waitress",
        f"--listen=127.0.0.1:{port}", f"--threads={threads}",
        *(["--call"] if call else []),
        *extra_args, app_spec,
    ]  # fmt: skip
    server = ServerProcess(cmd, port, env=env, cwd=cwd, log_dir=log_dir, name="waitress")
    return server.start() if start else server


# --------------------------------------------------------------------------------------
# Raw-socket HTTP
# --------------------------------------------------------------------------------------


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


__all__ = [
    "REPO_ROOT",
    "ServerError",
    "ServerProcess",
    "descendants",
    "pid_alive",
    "free_port",
    "group_members",
    "gunicorn",
    "http_get",
    "raw_connect",
    "read_first_chunk_and_drop",
    "send_and_close",
    "waitress",
    "werkzeug_dev",
]
