"""The pgbouncer and replica test infrastructure (tests/fix_pgbouncer.py, tests/fix_replica.py)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors

from tests import fix_replica as replica
from tests import pg
from tests.fix_pgbouncer import PgBouncer, pgbouncer_server

pytestmark = pytest.mark.slow


@pytest.fixture
def own_db(pg_admin: psycopg.Connection[Any]) -> Iterator[str]:
    """A fresh database: through pgbouncer it gets a pool of its own (``*`` entry)."""
    name = pg.create_database(pg_admin, "bouncer")
    try:
        yield name
    finally:
        pg.drop_database(pg_admin, name)


def _uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


# -- pgbouncer --------------------------------------------------------------------------


def test_query_through_pgbouncer(pgbouncer: PgBouncer, pg_admin: psycopg.Connection[Any]) -> None:
    assert pgbouncer.alive()
    assert pgbouncer.pool_mode == "transaction"
    assert pgbouncer.version
    if os.geteuid() == 0:
        assert _uid(pgbouncer.pid) != 0, "pgbouncer refuses root: it must run unprivileged"
    name = pg.unique_name("bouncer")
    with psycopg.connect(pgbouncer.conninfo(application_name=name), autocommit=True) as conn:
        assert conn.info.port == pgbouncer.port
        row = conn.execute("SELECT 1, current_database(), pg_backend_pid()").fetchone()
        assert row is not None
        assert row[:2] == (1, pgbouncer.target["dbname"])
        # The backend pgbouncer used is a real one on the target server...
        assert row[2] in {s["remote_pid"] for s in pgbouncer.servers()}
        (server_name,) = pg_admin.execute(  # type: ignore[misc]
            "SELECT application_name FROM pg_stat_activity WHERE pid = %s", (row[2],)
        ).fetchone()
        # ...which pgbouncer gave this client's application_name while it was linked.
        assert server_name == name
        # And SHOW CLIENTS knows this client by its application_name.
        assert name in {c["application_name"] for c in pgbouncer.clients()}


def test_show_pools_lists_the_database(pgbouncer: PgBouncer) -> None:
    with psycopg.connect(pgbouncer.dsn, autocommit=True) as conn:
        conn.execute("SELECT 1")
        pool = pgbouncer.pool()
        assert pool["pool_mode"] == "transaction"
        assert pool["cl_active"] >= 1
    assert {"database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle"} <= set(pool)
    config = {row["key"]: row["value"] for row in pgbouncer.show("CONFIG")}
    assert config["pool_mode"] == "transaction"
    assert config["default_pool_size"] == "4"
    assert config["listen_port"] == str(pgbouncer.port)
    with pytest.raises(ValueError):
        pgbouncer.show("POOLS; SHUTDOWN")


def test_set_outside_a_transaction_does_not_stick(pgbouncer: PgBouncer, own_db: str) -> None:
    """Transaction pooling: session state stays on the server backend, not with the client.

    A sets a session setting in an autocommit statement; B then opens a transaction and is
    given that same backend (pgbouncer reuses the most recently released one), so B sees
    A's setting; A's next statement runs on another backend, without it.
    """
    dsn = pgbouncer.conninfo(dbname=own_db)
    with psycopg.connect(dsn, autocommit=True) as a, psycopg.connect(dsn, autocommit=True) as b:
        (value, pid_a1) = a.execute(  # type: ignore[misc]
            "SELECT set_config('statement_timeout', '1234ms', false), pg_backend_pid()"
        ).fetchone()
        assert value == "1234ms"
        with b.transaction():
            pid_b, b_timeout = b.execute(  # type: ignore[misc]
                "SELECT pg_backend_pid(), current_setting('statement_timeout')"
            ).fetchone()
            pid_a2, a_timeout = a.execute(  # type: ignore[misc]
                "SELECT pg_backend_pid(), current_setting('statement_timeout')"
            ).fetchone()
            pool = pgbouncer.pool(own_db)
        assert pid_b == pid_a1, "B was expected to get the backend A just released"
        assert b_timeout == "1234ms", "A's session setting leaked to B"
        assert pid_a2 != pid_a1
        assert a_timeout == "0", "A's SET did not follow A"
        assert pool["sv_active"] + pool["sv_idle"] + pool["sv_used"] >= 2


def test_prepared_statements_need_prepare_threshold_none(pgbouncer: PgBouncer, own_db: str) -> None:
    """pgbouncer < 1.21: a statement prepared on one backend is missing on the next."""
    major, minor = (int(x) for x in pgbouncer.version.split(".")[:2])
    if (major, minor) >= (1, 21):
        pytest.skip(f"pgbouncer {pgbouncer.version} may track prepared statements itself")
    dsn = pgbouncer.conninfo(dbname=own_db)
    query = "SELECT pg_backend_pid(), %s::int"
    # psycopg names prepared statements _pg3_0, _pg3_1... per connection, so a client
    # preparing on a backend that holds another client's gets DuplicatePreparedStatement:
    # prepare_threshold=None is needed on *every* client of a transaction-mode pgbouncer.
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as other:
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as conn:
            pid, _ = conn.execute(query, (1,)).fetchone()  # type: ignore[misc]
            with other.transaction():  # takes the backend holding the prepared statement
                assert other.execute("SELECT pg_backend_pid()").fetchone() == (pid,)
                with pytest.raises(errors.InvalidSqlStatementName):
                    conn.execute(query, (2,))
        # The statement outlives its client on that backend (transaction mode runs no
        # DISCARD ALL), which 'other' released last, so the next client gets it.
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as conn:
            with pytest.raises(errors.DuplicatePreparedStatement):
                conn.execute(query, (3,))
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
            for i in range(10):
                with other.transaction():
                    other.execute("SELECT 1")
                    assert conn.execute(query, (i,)).fetchone()[1] == i  # type: ignore[index]


def test_options_startup_parameter_is_refused(pgbouncer: PgBouncer) -> None:
    """What ``REQCONN_SESSION_SETTINGS`` (sent as ``options=-c ...``) meets in pgbouncer."""
    with pytest.raises(psycopg.OperationalError, match="unsupported startup parameter: options"):
        psycopg.connect(pgbouncer.conninfo(options="-c statement_timeout=1000"))
    # application_name is handled by pgbouncer itself.
    with psycopg.connect(pgbouncer.conninfo(application_name="x"), autocommit=True) as conn:
        assert conn.execute("SHOW application_name").fetchone() == ("x",)


def test_session_mode_and_stop(
    make_pgbouncer: Callable[..., PgBouncer],
    pg_dsn: str,
    pg_admin: psycopg.Connection[Any],
    own_db: str,
    tmp_path: Path,
) -> None:
    bouncer = make_pgbouncer(pool_mode="session", default_pool_size=2)
    assert bouncer.show("CONFIG") and bouncer.pool_mode == "session"
    with psycopg.connect(bouncer.conninfo(dbname=own_db), autocommit=True) as conn:
        conn.execute("SET statement_timeout = '1234ms'")
        for _ in range(3):
            assert conn.execute("SHOW statement_timeout").fetchone() == ("1234ms",)

    # Stopping: the process is gone, its port closed, its server connections closed, and
    # a client still connected is cut off.
    with pgbouncer_server(pg_dsn, tmpdir=tmp_path) as other:
        pid, port = other.pid, other.port
        client = psycopg.connect(other.conninfo(dbname=own_db), autocommit=True)
        client.execute("SELECT 1")
        assert other.servers(own_db)
        assert "login attempt" in other.log_text()
    try:
        assert not other.alive()
        assert not os.path.exists(f"/proc/{pid}")
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
        with pytest.raises(psycopg.OperationalError):
            client.execute("SELECT 1")
    finally:
        client.close()

    def strays() -> list[int]:
        keep = {s["remote_pid"] for s in bouncer.servers(own_db)}
        rows = pg_admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (own_db,)
        ).fetchall()
        return [pid for (pid,) in rows if pid not in keep]

    # Only the session-mode bouncer's idle server connection may remain.
    pg.wait_until(lambda: strays() == [], timeout=10, message="stopped pgbouncer's backends gone")


# -- the second server ------------------------------------------------------------------


def test_replica_answers_and_is_another_server(pg_dsn: str, replica_dsn: str) -> None:
    primary_id = replica.dsn_identity(pg_dsn)
    replica_id = replica.dsn_identity(replica_dsn)
    assert primary_id != replica_id
    assert primary_id[1] is False
    with psycopg.connect(replica_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    if replica_id[1]:  # a streaming hot standby
        assert replica_id[0] == primary_id[0]
        table = pg.unique_name("replicated")
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {table} (x int)")
            conn.execute(f"INSERT INTO {table} VALUES (42)")
        try:
            replica.wait_for_replay(pg_dsn, replica_dsn)
            with psycopg.connect(replica_dsn, autocommit=True) as conn:
                assert conn.execute(f"SELECT x FROM {table}").fetchall() == [(42,)]
                with pytest.raises(errors.ReadOnlySqlTransaction):
                    conn.execute(f"INSERT INTO {table} VALUES (1)")
        finally:
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                conn.execute(f"DROP TABLE {table}")
    else:
        assert replica_id[0] != primary_id[0]
        assert os.environ.get(replica.MODE_ENV) == "independent" or not (
            replica.streaming_possible(pg_dsn)
        )


def test_pgbouncer_in_front_of_the_replica(
    make_pgbouncer: Callable[..., PgBouncer], replica_dsn: str
) -> None:
    bouncer = make_pgbouncer(target_dsn=replica_dsn)
    with psycopg.connect(bouncer.dsn, autocommit=True) as conn:
        assert replica.identity(conn) == replica.dsn_identity(replica_dsn)
