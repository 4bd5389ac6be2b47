"""A watchdog process that cleans up after a crashed owner.

The owner (a pytest session, the demo, a benchmark) registers what it starts: a process to
stop with a plan of signals, a process group to stop or kill, a directory to remove. The
watchdog runs in a session of its own, so a signal to the owner's process group (``timeout``,
a CI runner cancelling a job) does not reach it, and blocks reading a pipe whose only writer
is the owner. On a clean exit the owner disarms it (:meth:`Watchdog.release`); on EOF without
that (the owner died, even by SIGKILL) it stops every process still registered, checking PID,
start time and command line first, and removes the directories. Runs as
``python -m flask_reqconn.testing.watchdog``.

:func:`shared_watchdog` is one watchdog per process for things registered and unregistered
one by one (every :class:`~flask_reqconn.testing.ServerProcess` is): it is never disarmed,
so whatever is still registered when the process exits, however it exits, is stopped.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from .procs import group_members, pid_alive, read_stat

__all__ = [
    "POSTGRES_STOP",
    "TERM_THEN_KILL",
    "Watchdog",
    "release_watchdog",
    "shared_watchdog",
    "start_watchdog",
]

#: How to stop a PostgreSQL postmaster: fast, then immediate shutdown, then kill.
POSTGRES_STOP = "SIGINT:10,SIGQUIT:5,SIGKILL:5"
#: How to stop most servers.
TERM_THEN_KILL = "SIGTERM:10,SIGKILL:5"

_DISARM = "="


class Watchdog:
    """Handle on a watchdog process (see the module docstring)."""

    def __init__(self) -> None:
        package_root = str(Path(__file__).resolve().parent.parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH")) if p
        )
        self.proc: subprocess.Popen[str] | None = subprocess.Popen(
            [sys.executable, "-m", "flask_reqconn.testing.watchdog"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
            text=True,
            env=env,
            cwd="/",
        )
        self._lock = threading.Lock()  # one line at a time from any thread

    def __repr__(self) -> str:
        return f"<Watchdog pid={self.proc.pid if self.proc else None}>"

    def _send(self, line: str) -> None:
        with self._lock:
            if self.proc is None or self.proc.stdin is None:
                raise RuntimeError("watchdog already released")
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()

    def stop_process(self, pid: int, name: str, plan: str = TERM_THEN_KILL) -> str:
        """Register *pid* (whose command line contains *name*) to be stopped with *plan*
        (``"SIGTERM:10,SIGKILL:5"``: signal, then seconds to wait). Returns a token for
        :meth:`forget`."""
        st = read_stat(pid)
        token = f"proc {pid} {st.starttime if st else -1} {plan} {name}"
        self._send("+" + token)
        return token

    def stop_group(self, pid: int, name: str, plan: str = TERM_THEN_KILL) -> str:
        """Register the process group led by *pid* (whose command line contains *name*) to be
        stopped with *plan*, each signal sent to the whole group, then SIGKILL for anything
        left in it. For a server started in a session of its own, with its workers.
        Returns a token for :meth:`forget`."""
        st = read_stat(pid)
        token = f"pgrp {pid} {st.starttime if st else -1} {plan} {name}"
        self._send("+" + token)
        return token

    def kill_group(self, pgid: int) -> str:
        """Register process group *pgid* to be killed (SIGKILL)."""
        token = f"group {pgid}"
        self._send("+" + token)
        return token

    def remove_dir(self, path: str | os.PathLike[str]) -> str:
        """Register a directory to be removed (after the processes are stopped)."""
        token = f"dir {os.fspath(path)}"
        self._send("+" + token)
        return token

    def forget(self, token: str) -> None:
        """Unregister something its owner has cleaned up itself."""
        self._send("-" + token)

    def release(self) -> None:
        """The owner cleaned up: disarm the watchdog and reap it. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            assert proc.stdin is not None
            proc.stdin.write(_DISARM + "\n")
            proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_watchdog(pid: int, name: str, plan: str, dirs: Iterable[str] = ()) -> Watchdog:
    """A watchdog that stops *pid* with *plan* and removes *dirs* if its owner dies first.

    Release it with :func:`release_watchdog` after a normal teardown.
    """
    watchdog = Watchdog()
    watchdog.stop_process(pid, name, plan)
    for d in dirs:
        watchdog.remove_dir(d)
    return watchdog


def release_watchdog(watchdog: Watchdog | None) -> None:
    """:meth:`Watchdog.release`, accepting None."""
    if watchdog is not None:
        watchdog.release()


_shared: Watchdog | None = None
_shared_pid = 0
_shared_lock = threading.Lock()
_inherited: list[Watchdog] = []  # a forked child's copy of its parent's: kept, never used


def shared_watchdog() -> Watchdog:
    """This process's own watchdog, started on first use (and again in a forked child).

    Register with it and :meth:`~Watchdog.forget` once cleaned up. It is never disarmed: at
    interpreter exit its pipe is closed, and whatever is still registered then is stopped,
    as it is when the process dies without an exit (SIGTERM, SIGKILL).
    """
    global _shared, _shared_pid
    with _shared_lock:
        if _shared is None or _shared_pid != os.getpid():
            if _shared is None:
                atexit.register(_close_shared)
            else:
                _inherited.append(_shared)
            _shared, _shared_pid = Watchdog(), os.getpid()
        return _shared


def _close_shared() -> None:
    """At exit: EOF to the shared watchdog, which stops what is still registered; reap it."""
    global _shared
    with _shared_lock:
        watchdog, _shared = _shared, None
    if watchdog is None or _shared_pid != os.getpid() or watchdog.proc is None:
        return
    proc, watchdog.proc = watchdog.proc, None
    with contextlib.suppress(OSError, ValueError):
        assert proc.stdin is not None
        proc.stdin.close()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        pass  # it keeps going on its own; nothing waits for it any more


# -- the watchdog process ----------------------------------------------------------------


def _is_ours(pid: int, start: int, name: str) -> bool:
    if not pid_alive(pid, None if start < 0 else start):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return name.encode() in f.read()
    except OSError:
        return False


def _stop(pid: int, start: int, plan: str, name: str) -> None:
    if not _is_ours(pid, start, name):
        return
    for step in plan.split(","):
        sig, wait = step.split(":")
        try:
            os.kill(pid, getattr(signal, sig))
        except OSError:
            return
        deadline = time.monotonic() + float(wait)
        while pid_alive(pid, start) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not pid_alive(pid, start):
            return


def _stop_group(pid: int, start: int, plan: str, name: str) -> None:
    if not _is_ours(pid, start, name):
        return
    for step in plan.split(","):
        sig, wait = step.split(":")
        with contextlib.suppress(OSError):
            os.killpg(pid, getattr(signal, sig))
        deadline = time.monotonic() + float(wait)
        while group_members(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not group_members(pid):
            return
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)


def _main() -> None:
    todo: dict[str, None] = {}
    for line in sys.stdin:
        line = line.rstrip("\n")
        if line == _DISARM:
            return
        if line[:1] == "+":
            todo[line[1:]] = None
        elif line[:1] == "-":
            todo.pop(line[1:], None)
    items = [item.split(" ", 4) for item in todo]
    for item in items:
        if item[0] == "group":
            with contextlib.suppress(OSError):
                os.killpg(int(item[1]), signal.SIGKILL)
        elif item[0] == "proc":
            _stop(int(item[1]), int(item[2]), item[3], item[4])
        elif item[0] == "pgrp":
            _stop_group(int(item[1]), int(item[2]), item[3], item[4])
    for item in items:
        if item[0] == "dir":
            shutil.rmtree(" ".join(item[1:]), ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C of the owner's terminal
    _main()
