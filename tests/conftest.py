"""Shared fixtures. Logic lives in tests/pg.py and tests/servers.py."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests import pg, servers


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """Conninfo of the test PostgreSQL (``$REQCONN_TEST_DSN`` or a throwaway server)."""
    with contextlib.ExitStack() as stack:
        error: str | None = None
        try:
            dsn = stack.enter_context(pg.pg_server())
        except pg.PgSetupError as exc:
            error = str(exc)
        if error is not None:
            pytest.fail(f"test PostgreSQL unavailable: {error}", pytrace=False)
        yield dsn


@pytest.fixture(scope="session")
def pg_admin(pg_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the test server, for assertions."""
    conn = psycopg.connect(
        pg.with_conninfo(pg_dsn, application_name="reqconn-tests-admin"), autocommit=True
    )
    try:
        yield conn
    finally:
        conn.close()


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
        server = make(*args, start=False, **kwargs)
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


from tests.appfixtures import make_app  # noqa: E402,F401  (fixture)
