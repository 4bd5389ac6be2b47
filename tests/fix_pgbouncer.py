"""pgbouncer for the test suite: a real pgbouncer process in front of the test PostgreSQL.

A pytest plugin (registered in tests/conftest.py): fixtures ``pgbouncer`` and
``make_pgbouncer``, on top of ``pgbouncer_server``.

``pgbouncer_server(target_dsn)`` writes a config into a fresh directory, starts the
``pgbouncer`` binary (Debian's package; ``scripts/dev.py test`` installs it) in the foreground
in its own session, waits until a ``SELECT 1`` through it works, and on exit stops it by PID
(SIGTERM, then SIGKILL) and checks through /proc that it is gone.

Without a ``pgbouncer`` binary (plain ``pytest`` on a machine without the package) the
tests that need one are skipped, saying how to install it. A binary named by
``$REQCONN_TEST_PGBOUNCER`` must work: ``scripts/dev.py test`` names the one it found or
installed, so a full run never skips them.

Things worth knowing (pgbouncer 1.18, Debian bookworm):

* pgbouncer refuses to run as root. Under root it runs as the owner of the target's unix
  socket directory (``embedded_postgres`` for the embedded server, whose socket directory is
  its 0700 data directory) or else as ``nobody``; its directory and files are made readable
  for that user. Its output goes to a log file opened by us, so it never needs to write.
* The target may be a unix socket directory (``host=/path``): pgbouncer connects to
  ``/path/.s.PGSQL.<port>`` itself. Clients always reach pgbouncer over TCP on 127.0.0.1.
* Startup parameters: pgbouncer 1.18 handles ``client_encoding``, ``DateStyle``,
  ``TimeZone``, ``standard_conforming_strings`` and ``application_name`` itself and refuses
  any other (``unsupported startup parameter: options``) unless it is listed in
  ``ignore_startup_parameters``. Listing ``options`` there would make pgbouncer silently drop
  ``-c name=value`` settings, so it is *not* listed by default: a client sending settings
  that way fails loudly.
* The admin console (``dbname=pgbouncer``) only speaks the simple query protocol. psycopg
  sends a parameterless ``execute()`` that way; ``prepare_threshold=None`` keeps it from
  ever preparing.
* Transaction pooling: a server connection belongs to a client only for one transaction;
  ``SET`` outside a transaction, prepared statements (pgbouncer < 1.21), advisory locks,
  ``LISTEN`` and temp tables do not survive to the next transaction.
* Every database name is served (``* =`` fallback), so databases made with
  ``pg.create_database`` can be reached through the same pgbouncer.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

from flask_reqconn.testing import redacted
from flask_reqconn.testing.procs import pid_alive
from flask_reqconn.testing.servers import accepts, free_port
from flask_reqconn.testing.watchdog import Watchdog, release_watchdog, start_watchdog

#: The pgbouncer binary to use (not the config key REQCONN_PGBOUNCER, a boolean).
BINARY_ENV = "REQCONN_TEST_PGBOUNCER"
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
HOW_TO_INSTALL = (
    "pgbouncer is not installed: 'python3 scripts/dev.py test' installs it when run as root "
    "on Debian/Ubuntu; otherwise apt-get install pgbouncer (or brew install pgbouncer), or "
    f"set ${BINARY_ENV} to the binary's path"
)


class PgBouncerError(RuntimeError):
    """pgbouncer could not be provided, or did not stop."""


class PgBouncerMissing(PgBouncerError):
    """No pgbouncer binary is installed, and ``$REQCONN_TEST_PGBOUNCER`` names none."""


def find_binary() -> str:
    """Path of the pgbouncer binary ($REQCONN_TEST_PGBOUNCER, PATH, /usr/sbin); else raise."""
    explicit = os.environ.get(BINARY_ENV)
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise PgBouncerError(f"${BINARY_ENV}={explicit} is not an executable")
        return explicit
    found = shutil.which("pgbouncer")
    if found:
        return found
    for candidate in ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise PgBouncerMissing(HOW_TO_INSTALL)


def binary_version(binary: str | None = None) -> str:
    """E.g. ``"1.18.0"``, from ``pgbouncer --version``."""
    out = subprocess.run(
        [binary or find_binary(), "--version"], capture_output=True, text=True, check=True
    ).stdout
    first = out.splitlines()[0] if out else ""
    return first.split()[-1] if first else ""


# --------------------------------------------------------------------------------------
# A running pgbouncer
# --------------------------------------------------------------------------------------


@dataclass
class PgBouncer:
    """A running pgbouncer (what ``pgbouncer_server`` yields)."""

    dsn: str  # clients: TCP 127.0.0.1:port, the target's user and dbname
    admin_dsn: str  # the admin console (dbname=pgbouncer), same user
    pid: int
    port: int
    pool_mode: str
    default_pool_size: int
    max_client_conn: int
    version: str
    config_path: Path
    log_path: Path
    run_as: str | None  # the system user pgbouncer runs as (None: our own)
    target: dict[str, Any] = field(repr=False)  # host, port, user, dbname of the server

    def conninfo(self, **params: Any) -> str:
        """``dsn`` with parameters replaced or added (``dbname=``, ``application_name=``)."""
        return make_conninfo(self.dsn, **params)

    def admin(self, command: str) -> list[dict[str, Any]]:
        """Run one admin console command (``SHOW POOLS``, ``RECONNECT``, ``KILL db``...).

        Returns its rows as dicts (an empty list for commands without rows). Each call
        uses its own short admin connection.
        """
        with (
            psycopg.connect(
                self.admin_dsn, autocommit=True, prepare_threshold=None, connect_timeout=10
            ) as conn,
            conn.cursor(row_factory=dict_row) as cur,
        ):
            cur.execute(command.encode())
            return cur.fetchall() if cur.description is not None else []

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW <what>`` on the admin console: POOLS, CLIENTS, SERVERS, STATS, CONFIG..."""
        if not what.replace("_", "").isalnum():
            raise ValueError(f"not a SHOW subject: {what!r}")
        return self.admin(f"SHOW {what.upper()}")

    def pool(self, dbname: str | None = None, user: str | None = None) -> dict[str, Any]:
        """The ``SHOW POOLS`` row of one database/user pair (the target's by default)."""
        dbname = dbname or self.target["dbname"]
        user = user or self.target["user"]
        for row in self.show("POOLS"):
            if row["database"] == dbname and row["user"] == user:
                return row
        raise LookupError(f"no pgbouncer pool for database {dbname!r}, user {user!r}")

    def clients(self, dbname: str | None = None) -> list[dict[str, Any]]:
        """``SHOW CLIENTS`` rows of one database (the target's by default); admin excluded."""
        dbname = dbname or self.target["dbname"]
        return [r for r in self.show("CLIENTS") if r["database"] == dbname]

    def servers(self, dbname: str | None = None) -> list[dict[str, Any]]:
        """``SHOW SERVERS`` rows of one database (the target's by default)."""
        dbname = dbname or self.target["dbname"]
        return [r for r in self.show("SERVERS") if r["database"] == dbname]

    def log_text(self) -> str:
        """Everything pgbouncer wrote so far (its log goes to stderr, into this file)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return pid_alive(self.pid)


# --------------------------------------------------------------------------------------
# Starting and stopping
# --------------------------------------------------------------------------------------


def _target(target_dsn: str) -> dict[str, Any]:
    """host, port, user, dbname, password of the server, as libpq resolved them."""
    try:
        with psycopg.connect(target_dsn, autocommit=True, connect_timeout=10) as conn:
            info = conn.info
            host, port, user, dbname = info.host, info.port, info.user, info.dbname
            password = info.password or None
    except psycopg.Error as exc:
        raise PgBouncerError(
            f"cannot connect to the target {redacted(target_dsn)!r}: {exc}"
        ) from None
    return {"host": host, "port": int(port), "user": user, "dbname": dbname, "password": password}


def _run_as(target: dict[str, Any]) -> pwd.struct_passwd | None:
    """The unprivileged user to run pgbouncer as, or None if we are not root."""
    if os.geteuid() != 0:
        return None
    host = target["host"]
    if host.startswith("/"):
        with contextlib.suppress(OSError, KeyError):
            owner = pwd.getpwuid(os.stat(host).st_uid)
            if owner.pw_uid != 0:
                return owner
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        raise PgBouncerError(
            "running as root and there is no 'nobody' user to run pgbouncer as"
        ) from None


def _traversable(path: Path, user: pwd.struct_passwd | None) -> bool:
    """Can ``user`` reach files inside ``path`` (every ancestor searchable)?"""
    if user is None:
        return True
    for p in [path, *path.parents]:
        st = p.stat()
        if st.st_uid == user.pw_uid:
            ok = st.st_mode & 0o100
        elif st.st_gid == user.pw_gid:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            return False
    return True


def _quote(value: Any) -> str:
    """A value for a pgbouncer ``[databases]`` connection string."""
    text = str(value)
    if not text or any(c in text for c in " '\\"):
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return text


def _config(
    target: dict[str, Any],
    *,
    port: int,
    auth_file: Path,
    pool_mode: str,
    default_pool_size: int,
    max_client_conn: int,
    ignore_startup_parameters: str,
    extra: dict[str, Any],
) -> str:
    server = f"host={_quote(target['host'])} port={target['port']}"
    if target["password"]:
        server += f" password={_quote(target['password'])}"
    settings: dict[str, Any] = {
        "listen_addr": "127.0.0.1",
        "listen_port": port,
        "unix_socket_dir": "",  # TCP only: nothing to clash over in /tmp
        "auth_type": "trust",
        "auth_file": auth_file,
        "admin_users": target["user"],
        "stats_users": target["user"],
        "pool_mode": pool_mode,
        "default_pool_size": default_pool_size,
        "min_pool_size": 0,
        "reserve_pool_size": 0,
        "max_client_conn": max_client_conn,
        "ignore_startup_parameters": ignore_startup_parameters,
        "server_login_retry": 1,
        "log_connections": 1,
        "log_disconnections": 1,
        "log_pooler_errors": 1,
        "stats_period": 60,
        **extra,
    }
    lines = [
        "[databases]",
        f"{target['dbname']} = {server} dbname={_quote(target['dbname'])}",
        f"* = {server}",
        "",
        "[pgbouncer]",
        *(f"{k} = {v}" for k, v in settings.items()),
        "",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def pgbouncer_server(
    target_dsn: str,
    *,
    pool_mode: str = "transaction",
    default_pool_size: int = 4,
    max_client_conn: int = 200,
    tmpdir: str | os.PathLike[str] | None = None,
    ignore_startup_parameters: str = "extra_float_digits",
    extra_settings: dict[str, Any] | None = None,
) -> Iterator[PgBouncer]:
    """Run a pgbouncer in front of the server ``target_dsn`` names; yield a ``PgBouncer``.

    ``tmpdir``: where its config and log go (a fresh subdirectory). If pgbouncer's user
    could not reach it (pytest's 0700 temp dirs under root), a directory in the system temp
    dir is used instead and the log is copied into ``tmpdir`` at the end.
    ``extra_settings`` are added to (and override) the ``[pgbouncer]`` section.
    """
    if pool_mode not in ("session", "transaction", "statement"):
        raise ValueError(f"pool_mode: {pool_mode!r}")
    binary = find_binary()
    version = binary_version(binary)
    target = _target(target_dsn)
    user = _run_as(target)

    keep_dir = Path(tmpdir) if tmpdir is not None else None
    if keep_dir is not None and _traversable(keep_dir, user):
        rundir = Path(tempfile.mkdtemp(prefix="pgbouncer-", dir=keep_dir))
        own_dir = False
    else:
        rundir = Path(tempfile.mkdtemp(prefix="reqconn-pgbouncer-"))
        own_dir = True
    rundir.chmod(0o755)
    auth_file = rundir / "userlist.txt"
    config_path = rundir / "pgbouncer.ini"
    log_path = rundir / "pgbouncer.log"
    auth_file.write_text(f'"{target["user"]}" ""\n')
    auth_file.chmod(0o644)

    bouncer: PgBouncer | None = None
    proc: subprocess.Popen[bytes] | None = None
    watchdog: Watchdog | None = None
    problems: list[str] = []
    try:
        for attempt in range(5):  # a free port can be taken before pgbouncer binds it
            port = free_port()
            config_path.write_text(
                _config(
                    target,
                    port=port,
                    auth_file=auth_file,
                    pool_mode=pool_mode,
                    default_pool_size=default_pool_size,
                    max_client_conn=max_client_conn,
                    ignore_startup_parameters=ignore_startup_parameters,
                    extra=extra_settings or {},
                )
            )
            config_path.chmod(0o644)
            with open(log_path, "ab") as log:
                log.write(f"--- starting {binary} on port {port}\n".encode())
                log.flush()
                proc = subprocess.Popen(
                    [binary, str(config_path)],
                    cwd=rundir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    user=user.pw_uid if user else None,
                    group=user.pw_gid if user else None,
                    extra_groups=[] if user else None,
                )
            if _wait_ready(proc, port, target, log_path):
                break
            proc.wait()
            proc = None
            if attempt == 4 or "Address already in use" not in _tail(log_path, 2000):
                raise PgBouncerError(
                    f"pgbouncer did not start; its log ({log_path}):\n{_tail(log_path)}"
                )
        assert proc is not None
        watchdog = start_watchdog(
            proc.pid, "pgbouncer", "SIGTERM:10,SIGKILL:5", [str(rundir)] if own_dir else []
        )
        dsn = make_conninfo(
            "", host="127.0.0.1", port=port, user=target["user"], dbname=target["dbname"]
        )
        bouncer = PgBouncer(
            dsn=dsn,
            admin_dsn=make_conninfo(dsn, dbname="pgbouncer"),
            pid=proc.pid,
            port=port,
            pool_mode=pool_mode,
            default_pool_size=default_pool_size,
            max_client_conn=max_client_conn,
            version=version,
            config_path=config_path,
            log_path=log_path,
            run_as=user.pw_name if user else None,
            target=target,
        )
        yield bouncer
    finally:
        if proc is not None:
            problems += _stop(proc)
        if keep_dir is not None and own_dir and log_path.exists():
            with contextlib.suppress(OSError):
                shutil.copy(log_path, keep_dir / f"pgbouncer-{proc.pid if proc else 'x'}.log")
        if own_dir:
            shutil.rmtree(rundir, ignore_errors=True)
        release_watchdog(watchdog)
        if problems:
            raise PgBouncerError("; ".join(problems))


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no log)"


def _wait_ready(
    proc: subprocess.Popen[bytes], port: int, target: dict[str, Any], log_path: Path
) -> bool:
    """Until ``SELECT 1`` through pgbouncer works: True; False if pgbouncer exited."""
    dsn = make_conninfo(
        "",
        host="127.0.0.1",
        port=port,
        user=target["user"],
        dbname=target["dbname"],
        connect_timeout=5,
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if accepts(port):
            try:
                with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
                    conn.execute("SELECT 1")
                return True
            except psycopg.Error as exc:
                last = exc
        time.sleep(0.05)
    problems = _stop(proc)
    raise PgBouncerError(
        f"pgbouncer on port {port} not ready within {STARTUP_TIMEOUT:g}s (last error: {last}); "
        f"{'; '.join(problems)} log:\n{_tail(log_path)}"
    )


def _stop(proc: subprocess.Popen[bytes]) -> list[str]:
    """SIGTERM (immediate shutdown), then SIGKILL; reap; check the PID is gone."""
    for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
    if pid_alive(proc.pid):
        return [f"pgbouncer {proc.pid} is still running after SIGTERM and SIGKILL"]
    return []


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------


def _unavailable(exc: PgBouncerError) -> NoReturn:
    """Skip the test when pgbouncer is simply not installed; fail it for anything else."""
    if isinstance(exc, PgBouncerMissing):
        pytest.skip(str(exc))
    pytest.fail(f"pgbouncer unavailable: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def pgbouncer(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgBouncer]:
    """A real pgbouncer (transaction pooling, default_pool_size 4) in front of ``pg_dsn``.

    Shared by the whole session: for pool-level assertions (``SHOW POOLS``) connect to a
    database of your own (``pg.create_database``; every name is served) or use
    ``make_pgbouncer``. Without a pgbouncer binary the test is skipped (see the module's
    docstring); a pgbouncer that does not start fails it.
    """
    with contextlib.ExitStack() as stack:
        error: PgBouncerError | None = None
        try:
            bouncer = stack.enter_context(
                pgbouncer_server(pg_dsn, tmpdir=tmp_path_factory.mktemp("pgbouncer"))
            )
        except PgBouncerError as exc:
            error = exc
        if error is not None:
            _unavailable(error)
        yield bouncer


@pytest.fixture
def make_pgbouncer(pg_dsn: str, tmp_path: Path) -> Iterator[Callable[..., PgBouncer]]:
    """Factory for a pgbouncer of the test's own, stopped at teardown.

    ``make_pgbouncer(default_pool_size=2, pool_mode="session", target_dsn=...)``; arguments
    as for ``pgbouncer_server`` (``target_dsn`` defaults to ``pg_dsn``).
    """
    with contextlib.ExitStack() as stack:

        def factory(target_dsn: str | None = None, **kwargs: Any) -> PgBouncer:
            kwargs.setdefault("tmpdir", tmp_path)
            try:
                return stack.enter_context(pgbouncer_server(target_dsn or pg_dsn, **kwargs))
            except PgBouncerError as exc:
                _unavailable(exc)

        yield factory
