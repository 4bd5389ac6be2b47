"""Real WSGI server subprocesses (gunicorn, waitress, the Werkzeug dev server), by PID.

Every server runs in its own session (so its process group id is its PID, and a test can
signal the server and its workers without signalling itself), writes stdout and stderr to a
log file, and is stopped by PID: SIGTERM, then SIGKILL to the whole group, then a check
through ``/proc`` that the server and every child it was seen with are gone. Being in a
session of its own, a server does not get the signals sent to its owner's process group, so
from its start until it is stopped it is registered with the owner's
:func:`~flask_reqconn.testing.watchdog.shared_watchdog`, which stops its group if the owner
dies first (SIGTERM to pytest's group from ``timeout`` or a CI runner, SIGKILL of pytest).
The app is named the way the server takes it: ``"module:app"`` or, for an app factory,
``"module:create_app()"`` (gunicorn) / ``"module:create_app"`` (``flask --app``, waitress).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from .procs import descendants, group_members, pid_alive, read_stat
from .watchdog import shared_watchdog

__all__ = [
    "ServerError",
    "ServerProcess",
    "accepts",
    "free_port",
    "gunicorn",
    "waitress",
    "werkzeug_dev",
]

STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
#: How the watchdog stops the group of a server whose owner died: no one waits for it then.
ORPHAN_STOP = "SIGTERM:5,SIGKILL:5"

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


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """True if *host*:*port* accepts a TCP connection now."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class ServerError(AssertionError):
    """A server did not start, or did not stop cleanly."""


class ServerProcess:
    """A server subprocess listening on 127.0.0.1:*port*.

    Started with :meth:`start` (or as a context manager; the constructors below start it
    unless ``start=False``). Ready means: 127.0.0.1:*port* accepts TCP connections, at
    least *min_workers* child processes exist, and ``ready(self)`` (if given) is true.
    *cwd* (default: the current directory) is put first on the server's ``PYTHONPATH``.
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
        self.cwd = Path(cwd) if cwd is not None else Path.cwd()
        self.startup_timeout = startup_timeout
        self.min_workers = min_workers
        self.ready = ready
        self.env = _child_env(env, self.cwd)
        log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="srv-"))
        self.log_path = log_dir / f"{name}-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._start_time: int | None = None
        self._seen: dict[int, int] = {}  # every descendant ever seen: pid -> starttime
        self._stopped = False
        self._guard: str | None = None  # the shared watchdog's token for this server

    def __repr__(self) -> str:
        state = "not started" if self.proc is None else f"pid {self.proc.pid}"
        return f"<ServerProcess {self.name} {self.url} {state}>"

    # -- starting ----------------------------------------------------------------------

    def start(self) -> ServerProcess:
        """Start the server and wait until it is ready; stop it again if it is not."""
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
        st = read_stat(self.proc.pid)
        self._start_time = st.starttime if st else None
        try:
            self._guard = shared_watchdog().stop_group(
                self.proc.pid, Path(self.cmd[0]).name, ORPHAN_STOP
            )
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            raise
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
            listening = listening or accepts(self.port)
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
        """The server's (master's) PID, also its process group id."""
        if self.proc is None:
            raise RuntimeError(f"{self!r} not started")
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        """Everything the server wrote so far (stdout and stderr)."""
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
        """All living descendants of the server (and remember them for :meth:`stop`)."""
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
        return sorted(p for p in found if (st := read_stat(p)) is not None and st.ppid == self.pid)

    def signal(self, sig: int) -> None:
        """Send *sig* to the server process (not its group)."""
        if not self.is_running():
            raise RuntimeError(f"{self!r} is not running")
        os.kill(self.pid, sig)

    # -- stopping ----------------------------------------------------------------------

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait *timeout*, SIGKILL the group; check everything is gone.

        Returns the server's exit status. Raises :class:`ServerError` if any process of the
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
        guard, self._guard = self._guard, None
        if guard is not None:  # gone: nothing left for the watchdog (kept if anything is)
            shared_watchdog().forget(guard)
        return proc.returncode

    def _leftovers(self, pgid: int) -> dict[int, int]:
        left = {p: s for p, s in self._seen.items() if pid_alive(p, s)}
        left.update(group_members(pgid))
        return left


def _child_env(extra: Mapping[str, str | None] | None, cwd: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    paths = [str(cwd)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


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
    print(f"flask-reqconn: worker {worker.pid} ready", file=sys.stderr, flush=True)
"""


def _gunicorn_workers_ready(server: ServerProcess) -> bool:
    log = server.log_text()
    workers = server.worker_pids()
    return len(workers) >= server.min_workers and all(
        f"flask-reqconn: worker {pid} ready" in log for pid in workers
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

    *app_spec* as gunicorn takes it: ``"myapp:app"``, or ``"myapp:create_app()"`` for an
    app factory. The log (``log_text()``) has gunicorn's INFO lines and the app's output.

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
