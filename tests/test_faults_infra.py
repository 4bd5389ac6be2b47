"""The fault fixtures themselves (tests/fix_faults.py): each fault really happens, and
everything they create is gone afterwards, also when their owner is killed."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from flask_reqconn.testing.procs import read_stat
from tests import fix_faults, pg, servers
from tests.fix_faults import FaultServer


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run *fn* in a daemon thread; the list gets its result or exception."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # noqa: B036 - handed to the test
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _connect(server: FaultServer, name: str) -> psycopg.Connection[Any]:
    return psycopg.connect(server.dsn, autocommit=True, application_name=name, connect_timeout=10)


def _states(pids: dict[int, int]) -> set[str]:
    return {st.state for pid in pids if (st := read_stat(pid)) is not None}


# -- terminate ---------------------------------------------------------------------------


@pytest.mark.slow
def test_terminated_idle_connection_has_a_fatal_error_waiting(fault_pg: FaultServer) -> None:
    name = pg.unique_name("idle")
    conn = _connect(fault_pg, name)
    other = _connect(fault_pg, pg.unique_name("other"))
    try:
        conn.execute("SELECT 1")
        assert fault_pg.terminate(name, "idle") == 1
        readable, _, _ = select.select([conn.fileno()], [], [], 10)
        assert readable, "the socket of a terminated backend should be readable"
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            data = sock.recv(4096, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        finally:
            sock.close()
        assert data.startswith(b"E") and b"FATAL" in data and b"57P01" in data, data
        assert not conn.closed and not conn.broken  # psycopg cannot tell yet
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        other.execute("SELECT 1")  # another application's connection is untouched
    finally:
        conn.close()
        other.close()


@pytest.mark.slow
def test_terminate_busy_ends_the_running_query_and_spares_idle(fault_pg: FaultServer) -> None:
    name = pg.unique_name("busy")
    busy = _connect(fault_pg, name)
    idle = _connect(fault_pg, name)
    try:
        idle.execute("SELECT 1")
        thread, out = _in_thread(lambda: busy.execute("SELECT pg_sleep(60)"))
        with fault_pg.admin() as admin:
            pg.wait_until(
                lambda: any(s["state"] == "active" for s in pg.app_sessions(admin, name)),
                timeout=20, message="the query runs",
            )  # fmt: skip
        assert fault_pg.terminate(name, "active") == 1
        thread.join(20)
        assert not thread.is_alive(), "the terminated query should fail at once"
        assert isinstance(out[0], psycopg.OperationalError), out
        assert idle.execute("SELECT 2").fetchone() == (2,)
    finally:
        busy.close()
        idle.close()


# -- restart ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_restart_replaces_the_postmaster_and_breaks_connections(
    fault_pg: FaultServer, mode: fix_faults.RestartMode
) -> None:
    before = fault_pg.postmaster_pid
    conn = _connect(fault_pg, pg.unique_name("restart"))
    try:
        conn.execute("SELECT 1")
        fault_pg.restart(mode)
        after = fault_pg.postmaster_pid
        assert after is not None and after != before
        assert before is not None and not pg.pid_alive(before)
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()
    with _connect(fault_pg, "after") as fresh:
        assert fresh.execute("SELECT 3").fetchone() == (3,)


# -- freeze -------------------------------------------------------------------------------


@pytest.mark.slow
def test_frozen_server_does_not_answer_until_thawed(fault_pg: FaultServer) -> None:
    conn = _connect(fault_pg, pg.unique_name("frozen"))
    try:
        conn.execute("SELECT 1")
        with fault_pg.frozen():
            pids = fault_pg.server_pids()
            assert len(pids) >= 5  # postmaster, checkpointer, walwriter, ..., our backend
            # SIGSTOP takes effect once a process leaves the kernel (a moment in "D" or "R")
            pg.wait_until(lambda: _states(pids) == {"T"}, timeout=10, message="all stopped")
            thread, out = _in_thread(lambda: conn.execute("SELECT 4").fetchone())
            thread.join(2)
            assert thread.is_alive(), f"a frozen server answered: {out}"
        assert not fault_pg.is_frozen
        pg.wait_until(lambda: "T" not in _states(pids), timeout=10, message="all running")
        thread.join(20)
        assert out == [(4,)]
    finally:
        conn.close()


# -- silent drop --------------------------------------------------------------------------


@pytest.mark.slow
def test_blackholed_path_hangs_a_query_until_healed(netns_pg: FaultServer) -> None:
    assert netns_pg.path is not None
    conn = _connect(netns_pg, pg.unique_name("drop"))
    try:
        assert conn.info.host == netns_pg.path.ns_addr
        conn.execute("SELECT 1")
        with netns_pg.path.dropping():
            thread, out = _in_thread(lambda: conn.execute("SELECT 5").fetchone())
            thread.join(2)
            assert thread.is_alive(), f"a query over a dropped path answered: {out}"
            with netns_pg.admin() as admin:  # the unix socket is not on the path
                assert admin.execute("SELECT 1").fetchone() == (1,)
        thread.join(30)  # the next TCP retransmission gets through
        assert out == [(5,)]
    finally:
        conn.close()


# -- cleanup ------------------------------------------------------------------------------


def _plan_of(server: FaultServer) -> fix_faults.CleanupPlan:
    assert server.path is not None
    return fix_faults.CleanupPlan(
        pgdata=[str(server.pgdata)], netns=[server.path.netns], links=[server.path.root_link],
        routes=[f"{server.path.ns_addr}/32"], dirs=[str(server.pgdata.parent)],
    )  # fmt: skip


def _assert_gone(plan: fix_faults.CleanupPlan, pids: dict[int, int]) -> None:
    assert fix_faults.leftovers(plan) == []
    assert [p for p, s in pids.items() if servers.pid_alive(p, s)] == []
    assert not any(os.path.exists(d) for d in plan.dirs)


@pytest.mark.slow
def test_exit_removes_everything_even_frozen_and_dropped() -> None:
    with fix_faults.fault_server(netns=True) as server:
        plan = _plan_of(server)
        assert fix_faults.leftovers(plan) != []  # they do exist while it runs
        pids = server.server_pids()
        assert server.path is not None
        server.path.drop()
        server.freeze()
    _assert_gone(plan, pids)


_OWNER = """
import json, sys, time
from tests import fix_faults
with fix_faults.fault_server(netns=True) as server:
    server.freeze()
    server.path.drop()
    print(json.dumps({"pgdata": str(server.pgdata), "netns": server.path.netns,
                      "link": server.path.root_link, "addr": server.path.ns_addr,
                      "pids": server.server_pids()}), flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_watchdog_cleans_up_after_the_owner_is_killed() -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER], cwd=servers.REPO_ROOT,
        env=fix_faults._child_env(servers.REPO_ROOT), stdout=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline()
        info = json.loads(line)
        pids = {int(p): s for p, s in info["pids"].items()}
        # alive while their owner is: checked before it dies, since the watchdog may
        # clean up within moments of the death
        assert any(servers.pid_alive(p, s) for p, s in pids.items())
    finally:
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
    plan = fix_faults.CleanupPlan(
        pgdata=[info["pgdata"]], netns=[info["netns"]], links=[info["link"]],
        routes=[f"{info['addr']}/32"], dirs=[str(Path(info["pgdata"]).parent)],
    )  # fmt: skip
    pg.wait_until(
        lambda: not fix_faults.leftovers(plan)
        and not any(servers.pid_alive(p, s) for p, s in pids.items())
        and not os.path.exists(plan.dirs[0]),
        timeout=60, message="the watchdog removed the namespace, routes, server and directory",
    )  # fmt: skip
    _assert_gone(plan, pids)


def test_netns_without_root_fails_with_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(fix_faults.FaultSetupError, match="needs root"):
        with fix_faults.fault_server(netns=True):
            pass  # pragma: no cover


# -- the app and the figures of bench/faults.py --------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["reqconn", "bare", "check"])
def test_faultapp_variant_serves_with_a_pool_of_four(
    fault_pg: FaultServer, spawn: Callable[..., servers.ServerProcess], variant: str
) -> None:
    name = pg.unique_name(variant)
    server = spawn(
        "gunicorn", "tests.apps.faultapp:create_app()", worker_class="gthread", threads=8,
        env={"FAULT_VARIANT": variant, "FAULT_DSN": fault_pg.dsn, "FAULT_APPNAME": name},
    )  # fmt: skip
    assert servers.http_get(server.url + "/select1")[:3:2] == (200, b"1")
    assert servers.http_get(server.url + "/sleep?s=0.01")[0] == 200
    with fault_pg.admin() as admin:
        pg.wait_until(lambda: len(pg.app_sessions(admin, name)) == 4, timeout=30)
    stats = json.loads(servers.http_get(server.url + "/stats")[2])
    pool = stats["pools"]["default"]["pool"] if variant == "reqconn" else stats["pool"]
    assert pool["pool_max"] == 4


def test_fault_figures_count_statuses_longest_and_recovery() -> None:
    from bench.faults import Record, summarize

    records = [
        Record(0.0, 0.1, "200"),  # before the fault: not counted
        Record(0.9, 1.2, "200"),  # in flight when the fault began at 1.0
        Record(1.1, 4.1, "hang"),
        Record(1.5, 3.5, "503"),
        Record(3.6, 3.8, "500"),  # the fault ended at 3.0; still failing
        Record(3.7, 4.0, "200"),  # the first 200 after the fault: 1.0 s after its end
        Record(4.1, 4.2, "500"),  # an error after recovery
        Record(4.2, 4.3, "200"),
    ]
    got = summarize(records, started=1.0, ended=3.0, client_timeout=3.0)
    assert got["requests"] == 7
    assert got["statuses"] == {"200": 3, "500": 2, "503": 1, "hang": 1}
    assert got["hangs"] == 1
    assert got["longest_s"] == 3.0
    assert got["first_200_after_s"] == 1.0
    assert got["errors_after_recovery"] == 1
    assert summarize(records[:5], 1.0, 3.0, 3.0)["first_200_after_s"] is None
