"""The test infrastructure itself: PostgreSQL provider, server processes, HTTP helpers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psycopg
import pytest

from flask_reqconn import get_conn
from flask_reqconn.netdefaults import TCP_DEFAULTS, uses_tcp
from tests import pg, servers
from tests.appfixtures import AppFactory

HELLO = "tests.apps.hello:app"
HELLO_FACTORY = "tests.apps.hello:create_app"


# -- PostgreSQL -----------------------------------------------------------------------


def test_pg_dsn_connects(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert conn.info.server_version >= 140000
        (max_conn,) = conn.execute("SHOW max_connections").fetchone()  # type: ignore[misc]
    if not os.environ.get(pg.DSN_ENV):
        assert int(max_conn) >= pg.MAX_CONNECTIONS


def test_pg_tcp_reaches_the_server_over_tcp_and_the_apps_get_the_tcp_defaults(
    request: pytest.FixtureRequest, pg_dsn: str, make_app: AppFactory
) -> None:
    """What the TCP pass (``--pg-tcp``) is for: REQCONN_TCP_DEFAULTS reach the connections."""
    tcp = uses_tcp(pg_dsn)
    if not os.environ.get(pg.DSN_ENV):
        assert tcp == request.config.getoption("--pg-tcp")
    app = make_app()

    @app.get("/params")
    def params() -> dict[str, str]:
        return get_conn().info.get_parameters()

    got = app.test_client().get("/params").get_json()
    tuned = {k: str(v) for k, v in TCP_DEFAULTS.items() if k != "keepalives"}  # 1: libpq's
    if tcp:
        assert {k: got.get(k) for k in tuned} == tuned
    else:
        assert not set(tuned) & set(got)


def test_app_sessions_sees_and_loses_a_connection(
    pg_dsn: str, pg_admin: psycopg.Connection[Any]
) -> None:
    name = pg.unique_name("infra")
    assert pg.app_sessions(pg_admin, name) == []
    conn = psycopg.connect(pg.with_conninfo(pg_dsn, application_name=name))
    try:
        conn.execute("SELECT 1")  # opens a transaction: idle in transaction
        sessions = pg.wait_until(lambda: pg.app_sessions(pg_admin, name), timeout=10)
        assert len(sessions) == 1
        (session,) = sessions
        assert session["pid"] == conn.info.backend_pid
        assert session["state"] == "idle in transaction"
        assert session["xact_start"] is not None
        assert session["backend_type"] == "client backend"
    finally:
        conn.close()
    pg.wait_until(lambda: pg.app_sessions(pg_admin, name) == [], timeout=10)


def test_wait_until_reports_the_last_value() -> None:
    values = iter(range(1000))
    with pytest.raises(AssertionError, match="never three.*last value: 0"):
        pg.wait_until(lambda: next(values) * 0, timeout=0.2, interval=0.01, message="never three")


def test_create_and_drop_database(pg_dsn: str, pg_admin: psycopg.Connection[Any]) -> None:
    name = pg.create_database(pg_admin, "infra")
    try:
        with psycopg.connect(pg.with_conninfo(pg_dsn, dbname=name)) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (name,)
    finally:
        pg.drop_database(pg_admin, name)
    row = pg_admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    assert row is None


# -- Servers --------------------------------------------------------------------------


def _assert_gone(pids: list[int]) -> None:
    alive = [p for p in pids if servers.pid_alive(p)]
    assert alive == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("worker_class", "workers", "threads"),
    [("sync", 2, 1), ("gthread", 1, 4), ("gevent", 1, 1)],
)
def test_gunicorn_starts_serves_and_stops(
    tmp_path: Path, worker_class: str, workers: int, threads: int
) -> None:
    if worker_class == "gevent":
        pytest.importorskip("gevent")
    server = servers.gunicorn(
        HELLO, worker_class=worker_class, workers=workers, threads=threads, log_dir=tmp_path
    )
    try:
        worker_pids = server.worker_pids()
        assert len(worker_pids) == workers
        status, headers, body = servers.http_get(server.url + "/")
        assert (status, body) == (200, b"hello")
        assert headers["content-type"].startswith("text/html")
        status, _, body = servers.http_get(server.url + "/pid")
        assert status == 200 and int(body) in worker_pids
        master = server.pid
    finally:
        server.stop()
    assert server.returncode is not None
    _assert_gone([master, *worker_pids])
    assert "Booting worker" in server.log_text()


@pytest.mark.slow
def test_stop_cleans_up_workers_of_a_killed_master(tmp_path: Path) -> None:
    server = servers.gunicorn(HELLO, workers=2, log_dir=tmp_path)
    workers = server.worker_pids()
    server.signal(signal.SIGKILL)
    server.stop()
    _assert_gone([server.pid, *workers])


@pytest.mark.slow
def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    script = tmp_path / "stubborn.py"
    script.write_text(
        textwrap.dedent(
            """
            import signal, socket, sys, os
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if os.fork() == 0:  # a child in the same group that also ignores SIGTERM
                signal.pause()
            s = socket.socket()
            s.bind(("127.0.0.1", int(sys.argv[1])))
            s.listen()
            while True:
                s.accept()[0].close()
            """
        )
    )
    port = servers.free_port()
    with servers.ServerProcess(
        [sys.executable, str(script), str(port)], port, log_dir=tmp_path, min_workers=1
    ) as server:
        child = server.children()
        assert len(child) == 1
        assert server.stop(timeout=0.5) == -signal.SIGKILL
    _assert_gone([server.pid, *child])


@pytest.mark.slow
def test_start_failure_shows_the_log(tmp_path: Path) -> None:
    with pytest.raises(servers.ServerError, match="No module named 'tests.apps.nonesuch'"):
        servers.gunicorn("tests.apps.nonesuch:app", log_dir=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "spec"),
    [("werkzeug_dev", HELLO), ("werkzeug_dev", HELLO_FACTORY), ("waitress", HELLO),
     ("waitress", HELLO_FACTORY), ("gunicorn", HELLO_FACTORY + "()")],
)  # fmt: skip
def test_spawn_fixture_servers(spawn: Any, kind: str, spec: str) -> None:
    server = spawn(kind, spec)
    assert server.is_running()
    assert servers.http_get(server.url + "/")[::2] == (200, b"hello")
    pid = int(servers.http_get(server.url + "/pid")[2])
    assert pid == server.pid or pid in server.worker_pids()


@pytest.mark.slow
def test_raw_socket_helpers(spawn: Any) -> None:
    server = spawn("gunicorn", HELLO, worker_class="gthread", threads=4)
    status, headers, body = servers.http_get(server.url + "/stream")
    assert status == 200
    assert headers.get("transfer-encoding") == "chunked"
    assert body.startswith(b"first\n") and body.endswith(b"line 49\n")

    for how in ("close", "rst", "after_ms"):
        servers.send_and_close(server.url, "/", how=how, ms=5)
    status, first = servers.read_first_chunk_and_drop(server.url, "/stream", how="rst")
    assert status == 200 and b"first" in first
    status, first = servers.read_first_chunk_and_drop(server.url, "/stream")
    assert status == 200 and b"first" in first

    assert servers.http_get(server.url + "/")[::2] == (200, b"hello")
    assert server.is_running()


# -- the kit's /proc parser and watchdog -------------------------------------------------


def test_read_stat_parses_a_name_with_spaces_and_parentheses(tmp_path: Path) -> None:
    from flask_reqconn.testing import read_stat

    link = tmp_path / "od d) (x"
    link.symlink_to(sys.executable)
    proc = subprocess.Popen([str(link), "-c", "import time; time.sleep(30)"])
    try:
        st = read_stat(proc.pid)
        assert st is not None
        assert (st.ppid, st.alive) == (os.getpid(), True)
        # running, sleeping, or (seen on a clean clone in CI) in disk sleep while the
        # freshly started interpreter pages itself in: any live state parses the same way
        assert st.state in "RSD"
        assert servers.pid_alive(proc.pid, st.starttime)
        assert not servers.pid_alive(proc.pid, st.starttime + 1)  # a reused PID is not it
    finally:
        proc.kill()
        proc.wait()
    assert read_stat(proc.pid) is None


def _sleeper(tmp_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "reqconn-sleeper"],
        start_new_session=True,
    )


def test_watchdog_cleans_up_when_its_owner_dies(tmp_path: Path) -> None:
    from flask_reqconn.testing import Watchdog

    victim = _sleeper(tmp_path)
    left = tmp_path / "left behind"
    left.mkdir()
    watchdog = Watchdog()
    try:
        watchdog.stop_process(victim.pid, "reqconn-sleeper", "SIGTERM:5,SIGKILL:5")
        watchdog.remove_dir(left)
        assert watchdog.proc is not None and watchdog.proc.stdin is not None
        watchdog.proc.stdin.close()  # what the kernel does when the owner dies: EOF
        assert watchdog.proc.wait(30) == 0
        assert victim.wait(10) == -signal.SIGTERM
        assert not left.exists()
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()


def test_released_watchdog_leaves_everything_alone(tmp_path: Path) -> None:
    from flask_reqconn.testing import Watchdog

    victim = _sleeper(tmp_path)
    kept = tmp_path / "kept"
    kept.mkdir()
    try:
        watchdog = Watchdog()
        watchdog.stop_process(victim.pid, "reqconn-sleeper")
        watchdog.remove_dir(kept)
        token = watchdog.kill_group(victim.pid)
        watchdog.forget(token)
        watchdog.release()
        watchdog.release()  # idempotent
        assert victim.poll() is None and kept.is_dir()
    finally:
        victim.kill()
        victim.wait()


def test_watchdog_stops_a_whole_group_when_its_owner_dies(tmp_path: Path) -> None:
    from flask_reqconn.testing import Watchdog
    from flask_reqconn.testing.procs import group_members

    leader = subprocess.Popen(  # a leader in a session of its own, with a child in its group
        [sys.executable, "-c", "import os, time; os.fork(); time.sleep(60)", "reqconn-leader"],
        start_new_session=True,
    )
    try:
        members = pg.wait_until(
            lambda: len(group_members(leader.pid)) == 2 and group_members(leader.pid)
        )
        watchdog = Watchdog()
        watchdog.stop_group(leader.pid, "reqconn-leader", "SIGTERM:5,SIGKILL:5")
        assert watchdog.proc is not None and watchdog.proc.stdin is not None
        watchdog.proc.stdin.close()  # the owner died
        assert watchdog.proc.wait(30) == 0
        assert leader.wait(10) == -signal.SIGTERM
        assert not any(servers.pid_alive(p, start) for p, start in members.items())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()
