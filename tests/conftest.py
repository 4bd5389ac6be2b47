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
from tests.sqla_models import items, items_table  # noqa: E402,F401  (fixtures)

# -- pgbouncer and a second server (tests/pgbouncer.py, tests/replica.py) ----------------

# isort: split
from tests import pgbouncer as _pgbouncer  # noqa: E402
from tests import replica as _replica  # noqa: E402


@pytest.fixture(scope="session")
def pgbouncer(
    pg_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[_pgbouncer.PgBouncer]:
    """A real pgbouncer (transaction pooling, default_pool_size 4) in front of ``pg_dsn``.

    Shared by the whole session: for pool-level assertions (``SHOW POOLS``) connect to a
    database of your own (``pg.create_database``; every name is served) or use
    ``make_pgbouncer``. A missing pgbouncer binary fails, never skips.
    """
    with contextlib.ExitStack() as stack:
        error: str | None = None
        try:
            bouncer = stack.enter_context(
                _pgbouncer.pgbouncer_server(pg_dsn, tmpdir=tmp_path_factory.mktemp("pgbouncer"))
            )
        except _pgbouncer.PgBouncerError as exc:
            error = str(exc)
        if error is not None:
            pytest.fail(f"pgbouncer unavailable: {error}", pytrace=False)
        yield bouncer


@pytest.fixture
def make_pgbouncer(pg_dsn: str, tmp_path: Path) -> Iterator[Callable[..., _pgbouncer.PgBouncer]]:
    """Factory for a pgbouncer of the test's own, stopped at teardown.

    ``make_pgbouncer(default_pool_size=2, pool_mode="session", target_dsn=...)``; arguments
    as for ``tests.pgbouncer.pgbouncer_server`` (``target_dsn`` defaults to ``pg_dsn``).
    """
    with contextlib.ExitStack() as stack:

        def factory(target_dsn: str | None = None, **kwargs: Any) -> _pgbouncer.PgBouncer:
            kwargs.setdefault("tmpdir", tmp_path)
            try:
                return stack.enter_context(
                    _pgbouncer.pgbouncer_server(target_dsn or pg_dsn, **kwargs)
                )
            except _pgbouncer.PgBouncerError as exc:
                pytest.fail(f"pgbouncer unavailable: {exc}", pytrace=False)

        yield factory


@pytest.fixture(scope="session")
def replica_dsn(pg_dsn: str) -> Iterator[str]:
    """Conninfo of a second server acting as a read replica of ``pg_dsn``'s server.

    A real streaming hot standby when the primary is the embedded server (reads replay the
    primary's writes after ``tests.replica.wait_for_replay``; writes fail), otherwise an
    independent throwaway server; ``$REQCONN_TEST_REPLICA`` forces one. Tell the servers
    apart with ``tests.replica.identity(conn)``.
    """
    with contextlib.ExitStack() as stack:
        error: str | None = None
        try:
            dsn = stack.enter_context(_replica.second_server(pg_dsn))
        except pg.PgSetupError as exc:
            error = str(exc)
        if error is not None:
            pytest.fail(f"replica unavailable: {error}", pytrace=False)
        yield dsn
