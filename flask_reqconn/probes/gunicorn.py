"""gunicorn: sync, gthread and gevent workers, and ``gevent_pywsgi``.

The client socket is ``environ["gunicorn.socket"]`` (``"gunicorn.sock"``
under ``gevent_pywsgi``), peeked by :mod:`flask_reqconn.probes`; gunicorn's own
TLS sockets cannot be peeked. Its ``wsgi.file_wrapper`` keeps the file as
``.filelike``. How many requests a worker runs at once is read from the worker
object (its ``cfg``), found up the request thread's stack.
"""

from __future__ import annotations

import sys
import typing as t

from .workers import Concurrency, caller_self

#: The environ keys of the client socket, in the order tried.
SOCKET_KEYS = ("gunicorn.socket", "gunicorn.sock")


def is_file_wrapper(body: t.Any) -> bool:
    """Is *body* gunicorn's ``wsgi.file_wrapper`` (a file sent as is)?"""
    return getattr(body, "filelike", None) is not None


def concurrency(environ: t.Mapping[str, t.Any]) -> Concurrency | None:
    """How many requests this gunicorn worker runs at once, or None if unknown.

    ``sync``: 1; ``gthread``: ``--threads``; ``gevent``, ``eventlet`` (async workers):
    ``--worker-connections``; the worker processes from ``--workers``. Walks the frames
    up to the worker's ``handle_request``: call it once per process, in the thread
    serving a request.
    """
    if not any(key in environ for key in SOCKET_KEYS):
        return None
    base = sys.modules.get("gunicorn.workers.base")
    if base is None:
        return None
    worker = caller_self(base.Worker)
    if worker is None:
        return None
    cfg = worker.cfg
    kinds: list[tuple[str, str, str | None]] = [
        ("gunicorn.workers.gthread", "ThreadWorker", "threads"),
        ("gunicorn.workers.base_async", "AsyncWorker", "worker_connections"),
        ("gunicorn.workers.sync", "SyncWorker", None),
    ]
    for module_name, class_name, setting in kinds:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if cls is None or not isinstance(worker, cls):
            continue
        processes = int(cfg.workers)
        if setting is None:
            return Concurrency(1, "gunicorn sync worker", processes)
        value = int(getattr(cfg, setting))
        name = cfg.worker_class_str
        return Concurrency(
            value, f"gunicorn {name} worker, --{setting.replace('_', '-')} {value}", processes
        )
    return None
