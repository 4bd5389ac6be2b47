"""One background thread per worker process for periodic checks.

Started lazily, in the process that serves requests (never at import or in
``init_app``), restarted in a forked child, stopped at interpreter exit. Today
it runs leak detection (``REQCONN_LEAK_THRESHOLD``); it only ever *reads*
lease state and logs: releasing stays with the request's own thread.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import typing as t
import weakref

if t.TYPE_CHECKING:
    from .pool import PoolHolder

logger = logging.getLogger(__name__)


class Watcher:
    """Runs :meth:`PoolHolder.check_leaks` of every registered holder periodically."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders: weakref.WeakSet[PoolHolder] = weakref.WeakSet()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._stop = threading.Event()
        self._interval = 1.0

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and self._pid == os.getpid()

    def watch(self, holder: PoolHolder, interval: float) -> None:
        """Make sure *holder* is checked at least every *interval* seconds."""
        if self.running and holder in self._holders and interval >= self._interval:
            return
        with self._lock:
            self._holders.add(holder)
            self._interval = min(self._interval, interval)
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._start()

    def _start(self) -> None:
        self._stop = threading.Event()
        self._pid = os.getpid()
        self._thread = threading.Thread(
            target=self._run, name=f"flask-reqconn-watcher-{self._pid}", daemon=True
        )
        self._thread.start()
        logger.debug("watcher started in process %d", self._pid)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread of this process (idempotent)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and self._pid == os.getpid() and thread.is_alive():
            thread.join(timeout)

    def _run(self) -> None:
        stop = self._stop
        while not stop.wait(self._interval):
            for holder in list(self._holders):
                try:
                    holder.check_leaks()
                except Exception:  # never let the watcher die
                    logger.exception("leak check of %r failed", holder)


_watcher: Watcher | None = None
_watcher_lock = threading.Lock()


def get_watcher() -> Watcher:
    """The process-wide watcher, created on first use."""
    global _watcher
    if _watcher is None:
        with _watcher_lock:
            if _watcher is None:
                _watcher = Watcher()
                atexit.register(_watcher.stop)
    return _watcher
