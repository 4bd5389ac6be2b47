"""Processes seen through ``/proc``: one parser of ``/proc/<pid>/stat`` for the whole kit.

Linux only. A process that is gone, or a zombie, counts as not alive; a PID reused by
another process is told apart by its start time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "ProcStat",
    "cpu_seconds",
    "descendants",
    "group_members",
    "pid_alive",
    "read_stat",
    "wait_gone",
]

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` the kit uses."""

    pid: int
    state: str  # R, S, D, Z, X, T ...
    ppid: int
    pgrp: int
    utime: int  # clock ticks
    stime: int
    starttime: int  # clock ticks after boot: with the PID, names one process

    @property
    def alive(self) -> bool:
        """Neither a zombie nor dead."""
        return self.state not in ("Z", "X")


def read_stat(pid: int) -> ProcStat | None:
    """``/proc/<pid>/stat`` parsed, or None if there is no such process (or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(b")") + 2 :].split()
    return ProcStat(
        pid=pid,
        state=rest[0].decode(),
        ppid=int(rest[1]),
        pgrp=int(rest[2]),
        utime=int(rest[11]),
        stime=int(rest[12]),
        starttime=int(rest[19]),
    )


def pid_alive(pid: int, starttime: int | None = None) -> bool:
    """True if *pid* runs (not a zombie) and, if given, started at *starttime*.

    Without ``/proc`` for that PID (another PID namespace), falls back to ``kill(pid, 0)``.
    """
    st = read_stat(pid)
    if st is None:
        if os.path.isdir("/proc/self"):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return st.alive and (starttime is None or st.starttime == starttime)


def wait_gone(pid: int, timeout: float, starttime: int | None = None) -> bool:
    """Poll until *pid* is gone; False if it is still alive after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid, starttime):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _table() -> dict[int, ProcStat]:
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = read_stat(int(name))
            if st is not None:
                table[st.pid] = st
    return table


def descendants(pid: int) -> dict[int, int]:
    """Living descendants of *pid*: ``{pid: starttime}``."""
    table = _table()
    children: dict[int, list[int]] = {}
    for st in table.values():
        children.setdefault(st.ppid, []).append(st.pid)
    found: dict[int, int] = {}
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        if p in found or not table[p].alive:
            continue
        found[p] = table[p].starttime
        todo.extend(children.get(p, []))
    return found


def group_members(pgid: int) -> dict[int, int]:
    """Living processes in process group *pgid*: ``{pid: starttime}``."""
    return {st.pid: st.starttime for st in _table().values() if st.pgrp == pgid and st.alive}


def cpu_seconds(pids: Iterable[int]) -> float:
    """CPU seconds (user + system, all threads) used so far by *pids*; gone ones count 0."""
    ticks = 0
    for pid in pids:
        st = read_stat(pid)
        if st is not None:
            ticks += st.utime + st.stime
    return ticks / _CLK_TCK
