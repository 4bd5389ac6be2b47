"""The pool sizing check: one WARNING when a worker runs more requests at once than its pool.

Real servers (gunicorn gthread, gevent and sync, waitress, uWSGI) serve
``tests/apps/reqconn_app.py`` with its logging on; the concurrency each reports comes from
the server's own objects.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

import pytest

from flask_reqconn.probes import Concurrency, concurrency_for
from flask_reqconn.probes.workers import caller_self
from tests import fix_servers, pg, servers

Spawn = Callable[..., servers.ServerProcess]
APP = "tests.apps.reqconn_app:create_app"
WARNING = "WARNING flask_reqconn.sizing: pool 'default' (reqconn:"


def serve(spawn: Spawn, kind: str, pg_dsn: str, max_size: int, **options: Any) -> Any:
    env = {"RC_DSN": pg_dsn, "RC_APPNAME": pg.unique_name("sizing"),
           "RC_MAX_SIZE": str(max_size), "RC_LOG": "WARNING"}  # fmt: skip
    if kind == "gunicorn":
        return spawn("gunicorn", APP + "()", env=env, **options)
    if kind == "uwsgi":
        return spawn(fix_servers.uwsgi, APP, env=env, **options)
    return spawn(kind, APP, env=env, **options)


def sizing_lines(server: servers.ServerProcess, requests: int = 5) -> list[str]:
    """The sizing warnings after *requests* requests (each checks out)."""
    for _ in range(requests):
        status, _, body = servers.http_get(server.url + "/")
        assert status == 200, body
    return [line for line in server.log_text().splitlines() if line.startswith(WARNING)]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "options", "max_size", "source"),
    [
        ("gunicorn", {"worker_class": "gthread", "threads": 8}, 2,
         "gunicorn gthread worker, --threads 8"),
        ("gunicorn", {"worker_class": "gevent"}, 10,
         "gunicorn gevent worker, --worker-connections 1000"),
        ("waitress", {"threads": 4}, 2, "waitress, threads 4"),
        ("uwsgi", {"threads": 4}, 2, "uWSGI, --threads 4"),
    ],
    ids=["gunicorn-gthread", "gunicorn-gevent", "waitress", "uwsgi"],
)  # fmt: skip
def test_a_pool_smaller_than_the_worker_s_concurrency_is_warned_about_once(
    spawn: Spawn, pg_dsn: str, kind: str, options: dict[str, Any], max_size: int, source: str
) -> None:
    server = serve(spawn, kind, pg_dsn, max_size, **options)
    lines = sizing_lines(server)
    assert len(lines) == 1, server.log_tail()
    requests = int(source.rpartition(" ")[2])
    assert f" has REQCONN_MAX_SIZE = {max_size} connections, but this worker runs up to" \
           f" {requests} requests at once ({source}): under full load" \
           f" {requests - max_size} of them wait up to 5.0 s" in lines[0]  # fmt: skip
    assert "Fine if intended" in lines[0] and "flask_reqconn.sizing" in lines[0]
    print(lines[0])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "options", "max_size"),
    [
        ("gunicorn", {"worker_class": "gthread", "threads": 2}, 4),
        ("gunicorn", {"worker_class": "sync"}, 1),
        ("waitress", {"threads": 2}, 2),
    ],
    ids=["gunicorn-gthread", "gunicorn-sync", "waitress"],
)  # fmt: skip
def test_a_pool_that_fits_the_worker_s_concurrency_is_not_warned_about(
    spawn: Spawn, pg_dsn: str, kind: str, options: dict[str, Any], max_size: int
) -> None:
    server = serve(spawn, kind, pg_dsn, max_size, **options)
    assert sizing_lines(server) == [], server.log_tail()


# -- the pieces, without a server ----------------------------------------------------------


class Worker:
    def run(self, fn: Callable[[], Any]) -> Any:
        return fn()


def test_caller_self_finds_the_nearest_method_frame_of_a_class() -> None:
    worker = Worker()
    assert worker.run(lambda: caller_self(Worker)) is worker
    assert caller_self(Worker) is None


def test_without_a_known_server_the_concurrency_is_unknown() -> None:
    assert concurrency_for({}) is None
    assert concurrency_for({"werkzeug.socket": object()}) is None  # no bound to compare
    # a gunicorn environ outside a gunicorn worker: no worker up the stack
    assert concurrency_for({"gunicorn.socket": object()}) is None


@pytest.mark.parametrize(
    ("opt", "found"),
    [({"threads": b"4"}, Concurrency(4, "uWSGI, --threads 4")),
     ({}, Concurrency(1, "uWSGI, --threads 1")),
     ({"threads": [b"2", b"6"]}, Concurrency(6, "uWSGI, --threads 6")), ({"threads": b"x"}, None)],
)  # fmt: skip
def test_uwsgi_threads_come_from_uwsgi_opt(
    monkeypatch: pytest.MonkeyPatch, opt: dict[str, Any], found: Concurrency | None
) -> None:
    fake = types.ModuleType("uwsgi")
    fake.opt = opt  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "uwsgi", fake)
    assert concurrency_for({"uwsgi.version": b"2.0"}) == found
