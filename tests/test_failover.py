"""Failover: a multi-host conninfo follows a promoted standby; a read pool with
``target_session_attrs=prefer-standby`` falls over to the primary when the standby goes.

Each test has a primary of its own (tests/fix_faults.py's server on 127.0.0.1, never the
session's) and a real streaming hot standby of it on another port (tests/fix_replica.py),
and serves tests/apps/failoverapp.py under gunicorn gthread (1 worker, 8 threads, pools of
4, ``REQCONN_TIMEOUT = 2``) to 6 client threads looping through the fault. The bounds are
generous hang guards for a loaded 2-core machine; the figures printed (``-s``) are the ones
docs/failure-modes.rst gives.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from bench.faults import Clients, summarize
from flask_reqconn.netdefaults import TCP_DEFAULTS
from tests import pg, servers
from tests.fix_faults import FaultServer, FaultSetupError, RestartMode, fault_server
from tests.fix_replica import (
    ReplicaError,
    dsn_identity,
    promote,
    stop,
    streaming_replica,
    wait_for_replay,
)

pytestmark = pytest.mark.slow

APP = "tests.apps.failoverapp:create_app()"
CLIENT_TIMEOUT = 30.0
#: Promotion (or the standby's stop) to the first 200: a hang guard, not the figure.
RECOVERY_BOUND = 10.0
#: The same when the primary vanished silently: tcp_user_timeout (8 s) for the connections
#: to it, then connect_timeout (5 s) on it for every new connection, plus slack.
SILENT_BOUND = 30.0
#: Seconds of answers kept once the writes (or reads) settled on their new server:
#: hundreds of requests from 6 clients, every one a 200.
AFTER_SETTLE = 1.5


@dataclass
class Pair:
    """A primary and its streaming standby (on 127.0.0.1, the primary too unless it
    lives in a network namespace)."""

    primary: FaultServer
    standby_admin_dsn: str  # unix socket: for promote/stop and assertions
    standby_port: int

    @property
    def primary_addr(self) -> tuple[str, int]:
        return self.primary.host, self.primary.port

    @property
    def standby_addr(self) -> tuple[str, int]:
        return "127.0.0.1", self.standby_port

    def dsn(self, *addrs: tuple[str, int], **params: str) -> str:
        """A multi-host TCP conninfo for *addrs*, in that order."""
        return make_conninfo(
            host=",".join(h for h, _ in addrs),
            port=",".join(str(p) for _, p in addrs),
            user="postgres",
            dbname="postgres",
            **params,
        )


@contextlib.contextmanager
def _pair(*, netns: bool) -> Iterator[Pair]:
    """A throwaway primary with a ``failover_writes`` table, and a standby of it
    (streaming over the primary's unix socket, which no network fault touches)."""
    with contextlib.ExitStack() as stack:
        error: str | None = None
        try:
            primary = stack.enter_context(fault_server(netns=netns))
            with primary.admin() as conn:
                conn.execute(
                    "CREATE TABLE failover_writes (id bigserial PRIMARY KEY, port int,"
                    " at timestamptz DEFAULT clock_timestamp())"
                )
            port = servers.free_port()
            standby = stack.enter_context(streaming_replica(primary.admin_dsn, tcp_port=port))
            wait_for_replay(primary.admin_dsn, standby)
        except (FaultSetupError, ReplicaError) as exc:
            error = str(exc)
        if error is not None:
            pytest.fail(f"primary and standby unavailable: {error}", pytrace=False)
        yield Pair(primary, standby, port)


@pytest.fixture
def pair() -> Iterator[Pair]:
    """A primary on 127.0.0.1 and its standby."""
    with _pair(netns=False) as p:
        yield p


@pytest.fixture
def netns_pair() -> Iterator[Pair]:
    """A primary in a network namespace of its own (``primary.path`` drops the path
    silently; root only, fails otherwise) and its standby on 127.0.0.1."""
    with _pair(netns=True) as p:
        yield p


def _get(url: str) -> tuple[int, dict[str, str], Any]:
    status, headers, body = servers.http_get(url, timeout=CLIENT_TIMEOUT)
    return status, headers, json.loads(body) if status == 200 else body


def _serve(
    spawn: Callable[..., servers.ServerProcess], path: str, pool: str, **env: str
) -> servers.ServerProcess:
    proc = spawn(
        "gunicorn", APP, worker_class="gthread", workers=1, threads=8,
        env={"FAILOVER_APPNAME": pg.unique_name("failover"), **env},
    )  # fmt: skip

    def full() -> bool:
        if servers.http_get(proc.url + path, timeout=10)[0] != 200:
            return False
        stats = _get(proc.url + "/stats")[2]
        return bool(stats["pools"][pool]["pool"].get("pool_available", 0) >= 4)

    pg.wait_until(full, timeout=60, interval=0.2, message=f"pool {pool!r} of 4 ready")
    return proc


def _assert_clear_answers(
    proc: servers.ServerProcess,
    figures: dict[str, Any],
    bound: float = 0.0,
    *,
    after_first_200: bool = True,
) -> None:
    bound = bound or RECOVERY_BOUND
    assert set(figures["statuses"]) <= {"200", "503"}, (figures, proc.log_tail())
    assert figures["hangs"] == 0, figures
    assert figures["first_200_after_s"] is not None, (figures, proc.log_tail())
    assert figures["first_200_after_s"] < bound, figures
    if after_first_200:
        assert figures["errors_after_recovery"] == 0, figures
    assert figures["longest_s"] < CLIENT_TIMEOUT, figures
    assert "Traceback" not in proc.log_text(), proc.log_tail()


def _failover(
    pair: Pair,
    spawn: Callable[..., servers.ServerProcess],
    primary_goes: Callable[[], None],
    *,
    bound: float,
    settle: float = 0.0,
    **params: str,
) -> dict[str, Any]:
    """Writes through ``host=primary,standby target_session_attrs=read-write`` while the
    primary goes away (*primary_goes*) and the standby is promoted; the figures, timed
    from the promote request. Every request started *settle* seconds after the first 200
    (0: after it) must answer 200."""
    dsn = pair.dsn(pair.primary_addr, pair.standby_addr, target_session_attrs="read-write",
                   **params)  # fmt: skip
    proc = _serve(spawn, "/write", "default", FAILOVER_DSN=dsn)
    status, _, before = _get(proc.url + "/write")
    assert (status, before) == (200, {"port": pair.primary.port, "in_recovery": False})

    clients = Clients(proc.url, 6, "/write", timeout=CLIENT_TIMEOUT, max_requests=100_000)
    clients.start()
    try:
        time.sleep(1.0)
        gone = time.monotonic()
        primary_goes()
        # No writable server now: the standby refuses read-write sessions. A request
        # waits REQCONN_TIMEOUT for the pool (or its connection breaks), then answers
        # 503 with Retry-After.
        gap_status, gap_headers, _ = servers.http_get(proc.url + "/write", CLIENT_TIMEOUT)
        assert (gap_status, gap_headers.get("retry-after")) == (503, "1"), gap_headers
        promoting = time.monotonic()
        promote(pair.standby_admin_dsn)
        promoted = time.monotonic()
        pg.wait_until(
            lambda: any(r.status == "200" and r.start > promoted for r in clients.records),
            timeout=bound + CLIENT_TIMEOUT,
            message="a 200 after the promotion",
        )
        time.sleep(settle + AFTER_SETTLE)
    finally:
        clients.stop()
    figures = summarize(clients.records, gone, promoting, CLIENT_TIMEOUT)
    print(
        f"\nfailover ({params or 'defaults'}): promote requested {promoting - gone:.2f}s"
        f" after the primary went, done in {promoted - promoting:.2f}s; first 200"
        f" {figures['first_200_after_s']}s after the promote request; {figures}"
    )
    late = [
        (round(r.start - promoting, 2), round(r.end - promoting, 2), r.status)
        for r in clients.records
        if r.status != "200" and r.end > promoting
    ]
    print(f"non-200 answers ended after the promote request (start, end, status): {late}")
    _assert_clear_answers(proc, figures, bound, after_first_200=not settle)
    settled = promoting + figures["first_200_after_s"] + settle
    assert not [r for r in clients.records if r.start >= settled and r.status != "200"], late
    assert figures["statuses"].get("503", 0) > 0, figures  # the gap was seen

    for _ in range(5):  # every write now goes to the promoted standby
        status, _, after = _get(proc.url + "/write")
        assert (status, after) == (200, {"port": pair.standby_port, "in_recovery": False})
    assert dsn_identity(pair.standby_admin_dsn)[1] is False
    with psycopg.connect(pair.standby_admin_dsn, autocommit=True) as conn:
        rows = dict(conn.execute("SELECT port, count(*) FROM failover_writes GROUP BY port"))
    assert rows.get(pair.standby_port, 0) >= 5, rows
    stats = _get(proc.url + "/stats")[2]
    print(f"stats: {json.dumps({k: v for k, v in stats.items() if k != 'pools'})}")
    assert stats["checked_out"] == 0, stats
    return figures


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_writes_follow_the_promoted_standby_with_a_multi_host_conninfo(
    pair: Pair, spawn: Callable[..., servers.ServerProcess], mode: RestartMode
) -> None:
    """The primary stopped (its port refuses at once), the standby promoted."""
    _failover(pair, spawn, lambda: pair.primary.stop(mode), bound=RECOVERY_BOUND)


@pytest.mark.parametrize(
    "params",
    [{}, {"connect_timeout": "2", "tcp_user_timeout": "3000"}],
    ids=["tcp-defaults", "tuned"],
)
def test_writes_follow_the_promoted_standby_when_the_primary_vanishes_silently(
    netns_pair: Pair, spawn: Callable[..., servers.ServerProcess], params: dict[str, str]
) -> None:
    """The primary's path drops every packet (a host powered off, a partition): the
    connections to it surface after ``tcp_user_timeout``, and every new connection pays
    ``connect_timeout`` on the first host before it tries the standby."""
    path = netns_pair.primary.path
    assert path is not None
    # The pool refills one connection per connect_timeout (on the dead first host) per
    # pool worker: requests may still wait REQCONN_TIMEOUT in vain meanwhile.
    settle = float(params.get("connect_timeout", TCP_DEFAULTS["connect_timeout"])) + 2.0
    try:
        _failover(netns_pair, spawn, path.drop_replies, bound=SILENT_BOUND, settle=settle, **params)
    finally:
        path.heal()


def test_a_prefer_standby_read_pool_falls_over_to_the_primary_when_the_standby_goes(
    pair: Pair, spawn: Callable[..., servers.ServerProcess]
) -> None:
    writes = pair.dsn(pair.primary_addr, pair.standby_addr, target_session_attrs="read-write")
    reads = pair.dsn(pair.standby_addr, pair.primary_addr, target_session_attrs="prefer-standby")
    proc = _serve(spawn, "/read", "read", FAILOVER_DSN=writes, FAILOVER_READ_DSN=reads)
    status, _, before = _get(proc.url + "/read")
    assert (status, before) == (200, {"port": pair.standby_port, "in_recovery": True})

    clients = Clients(proc.url, 6, "/read", timeout=CLIENT_TIMEOUT, max_requests=100_000)
    clients.start()
    try:
        time.sleep(1.0)
        started = time.monotonic()
        stop(pair.standby_admin_dsn, "fast")
        ended = time.monotonic()
        # 4 s for the first 200 after the stop, then AFTER_SETTLE s of answers after it
        deadline = ended + 4.0
        while time.monotonic() < deadline and not any(
            r.status == "200" and r.end >= ended for r in list(clients.records)
        ):
            time.sleep(0.05)
        time.sleep(max(0.0, min(AFTER_SETTLE, deadline - time.monotonic())))
    finally:
        clients.stop()
    figures = summarize(clients.records, started, ended, CLIENT_TIMEOUT)
    print(f"\nstandby stopped in {ended - started:.2f}s; reads: {figures}")
    _assert_clear_answers(proc, figures)

    for _ in range(5):  # every read now goes to the primary
        status, _, after = _get(proc.url + "/read")
        assert (status, after) == (200, {"port": pair.primary.port, "in_recovery": False})
    stats = _get(proc.url + "/stats")[2]
    print(f"read pool: {json.dumps(stats['pools']['read'])}")
    assert stats["checked_out"] == 0, stats
