"""waitress: no socket in the environ, a callable instead.

``environ["waitress.client_disconnected"]()`` only changes during a request
when waitress runs with ``channel_request_lookahead > 0`` (the default 0 means
it never does). The watcher polls it. waitress's ``wsgi.file_wrapper`` keeps
the file as ``.file``. Its thread count is in the adjustments of the task
serving the request, found up the request thread's stack.
"""

from __future__ import annotations

import sys
import typing as t
from collections.abc import Callable

from .workers import Concurrency, caller_self

if t.TYPE_CHECKING:
    from . import ClientProbe


class WaitressProbe:
    """A client seen through ``waitress.client_disconnected``."""

    __slots__ = ("check",)

    watchable = True

    def __init__(self, check: Callable[[], t.Any]) -> None:
        self.check = check

    def fileno(self) -> int:
        return -1  # polled

    def gone(self, eof_means_gone: bool = True) -> bool:
        try:
            return bool(self.check())
        except Exception:
            return False

    def cut(self) -> bool:
        return False  # waitress buffers responses: a client that stops reading blocks nothing


def probe(environ: t.Mapping[str, t.Any]) -> ClientProbe | None:
    """The probe of a waitress request, or None when *environ* is not waitress's."""
    check = environ.get("waitress.client_disconnected")
    return WaitressProbe(check) if check is not None else None


def is_file_wrapper(body: t.Any) -> bool:
    """Is *body* waitress's ``wsgi.file_wrapper`` (a file sent as is)?"""
    return getattr(body, "file", None) is not None


def concurrency(environ: t.Mapping[str, t.Any]) -> Concurrency | None:
    """waitress's ``threads`` (each runs one request), or None if unknown.

    Walks the frames up to the task's ``execute``: call it once per process, in the
    thread serving a request.
    """
    if "waitress.client_disconnected" not in environ:
        return None
    task_cls = getattr(sys.modules.get("waitress.task"), "Task", None)
    if task_cls is None:
        return None
    task = caller_self(task_cls)
    threads = getattr(getattr(getattr(task, "channel", None), "adj", None), "threads", None)
    if not isinstance(threads, int):
        return None
    return Concurrency(threads, f"waitress, threads {threads}")
