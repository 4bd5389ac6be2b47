"""The suite's fixtures, as plugins (psycopg's layout).

* :mod:`flask_reqconn.testing.pytest_plugin`: ``--test-dsn``, ``pg_dsn``, ``pg_admin``,
  ``reqconn_strict``, ``serve_gunicorn`` (what users get);
* :mod:`tests.appfixtures`: ``make_app``, ``pg_tcp_dsn``;
* :mod:`tests.fix_pgbouncer`: ``pgbouncer``, ``make_pgbouncer``;
* :mod:`tests.fix_replica`: ``replica_dsn``;
* here: ``spawn``, and two rules about markers (tests/README.rst):

  - every test using :data:`SLOW_FIXTURES` must be marked ``slow``; collection stops
    otherwise, naming the tests;
  - every test using ``pg_dsn`` gets the ``pg`` marker, which the TCP pass of
    ``scripts/dev.py test`` selects (``--pg-tcp -m "pg and (not slow or tcp)"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import servers

pytest_plugins = (
    "pytester",
    "flask_reqconn.testing.pytest_plugin",
    "tests.appfixtures",
    "tests.fix_pgbouncer",
    "tests.fix_replica",
    "tests.fix_faults",
    "tests.sqla_models",
)

#: Fixtures that start processes of their own (servers, a PostgreSQL of the test's own,
#: pgbouncer): the tests using them are the ``slow`` ones.
SLOW_FIXTURES = frozenset(
    {"spawn", "serve_gunicorn", "pgbouncer", "make_pgbouncer", "fault_pg", "netns_pg",
     "replica_dsn"}
)  # fmt: skip


def pytest_itemcollected(item: pytest.Item) -> None:
    if "pg_dsn" in getattr(item, "fixturenames", ()):
        item.add_marker(pytest.mark.pg)


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = [
        f"{item.nodeid} (uses {', '.join(sorted(SLOW_FIXTURES & set(names)))})"
        for item in items
        if SLOW_FIXTURES & set(names := getattr(item, "fixturenames", ()))
        and item.get_closest_marker("slow") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests that start processes must be marked slow (@pytest.mark.slow, or"
            " pytestmark = pytest.mark.slow for a module); not marked:\n  "
            + "\n  ".join(unmarked)
        )


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., servers.ServerProcess]]:
    """Factory for real server subprocesses, all stopped (by PID) at teardown.

    ``spawn("gunicorn", "tests.apps.hello:app", workers=2)``; the first argument names a
    constructor in tests/servers.py (``gunicorn``, ``werkzeug_dev``, ``waitress``) or is a
    ``ServerProcess``-returning callable; the rest is passed on.
    """
    started: list[servers.ServerProcess] = []

    def factory(
        kind: str | Callable[..., servers.ServerProcess], *args: Any, **kwargs: Any
    ) -> servers.ServerProcess:
        make = getattr(servers, kind) if isinstance(kind, str) else kind
        kwargs.setdefault("log_dir", tmp_path)
        server: servers.ServerProcess = make(*args, start=False, **kwargs)
        started.append(server)
        server.start()
        return server

    yield factory
    errors = []
    for server in reversed(started):
        try:
            server.stop()
        except Exception as exc:  # stop every server even if one misbehaves
            errors.append(f"{server}: {exc}")
    if errors:
        pytest.fail("servers did not stop cleanly:\n" + "\n".join(errors), pytrace=False)
