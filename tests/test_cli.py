"""``flask reqconn ...`` over TCP, with a ``connect_timeout`` from each place it can come from.

The suite's server is reached over a unix socket; here the same server is reached over TCP
on 127.0.0.1 (``pg_tcp_dsn``), where ``REQCONN_TCP_DEFAULTS`` and libpq's TCP parameters
apply. The output checks of ``check`` and ``activity`` are in test_observability.py.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from flask import Flask

from flask_reqconn.netdefaults import TCP_DEFAULTS
from flask_reqconn.storm.oracles import PgOracle
from tests import pg
from tests.appfixtures import AppFactory

#: Where the connect_timeout of a TCP conninfo comes from: (conninfo parameters,
#: REQCONN_* settings, the connect_timeout the connection must use).
TIMEOUT_SOURCES: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "tcp-defaults": ({}, {}, str(TCP_DEFAULTS["connect_timeout"])),
    "connect-args": ({}, {"connect_args": {"connect_timeout": 7}}, "7"),
    "connect-args-without-tcp-defaults": (
        {},
        {"connect_args": {"connect_timeout": 7}, "tcp_defaults": False},
        "7",
    ),
    "conninfo": ({"connect_timeout": 7}, {}, "7"),
    "conninfo-without-tcp-defaults": ({"connect_timeout": 7}, {"tcp_defaults": False}, "7"),
}


def used_connect_timeout(conn: psycopg.Connection[Any]) -> str:
    """The connect_timeout libpq used for *conn* ("" if none)."""
    for option in conn.pgconn.info:
        if option.keyword == b"connect_timeout":
            return (option.val or b"").decode()
    raise AssertionError("libpq reports no connect_timeout option")


@pytest.fixture
def direct_connect_timeouts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The connect_timeout of every ``psycopg.connect`` connection (real ones: a spy)."""
    used: list[str] = []
    connect = psycopg.connect

    def spy(*args: Any, **kwargs: Any) -> psycopg.Connection[Any]:
        conn = connect(*args, **kwargs)
        used.append(used_connect_timeout(conn))
        return conn

    monkeypatch.setattr(psycopg, "connect", spy)
    return used


def tcp_app(make_app: AppFactory, tcp_dsn: str, source: str) -> Flask:
    params, settings, _expected = TIMEOUT_SOURCES[source]
    return make_app(conninfo=pg.with_conninfo(tcp_dsn, **params), **settings)


@pytest.mark.parametrize("source", TIMEOUT_SOURCES)
def test_check_works_over_tcp_and_keeps_the_configured_connect_timeout(
    make_app: AppFactory,
    pg_tcp_dsn: str,
    direct_connect_timeouts: list[str],
    source: str,
) -> None:
    app = tcp_app(make_app, pg_tcp_dsn, source)
    result = app.test_cli_runner().invoke(args=["reqconn", "check"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.exit_code == 0, result.output
    assert "host=127.0.0.1" in result.output
    assert result.output.rstrip().endswith("ok")
    assert direct_connect_timeouts == [TIMEOUT_SOURCES[source][2]]


def test_check_without_a_connect_timeout_waits_at_most_reqconn_timeout(
    make_app: AppFactory, pg_tcp_dsn: str, direct_connect_timeouts: list[str]
) -> None:
    app = make_app(conninfo=pg_tcp_dsn, tcp_defaults=False, timeout=3)
    result = app.test_cli_runner().invoke(args=["reqconn", "check"])
    assert result.exit_code == 0, result.output
    assert direct_connect_timeouts == ["3"]


@pytest.mark.parametrize("source", TIMEOUT_SOURCES)
def test_activity_works_over_tcp(make_app: AppFactory, pg_tcp_dsn: str, source: str) -> None:
    app = tcp_app(make_app, pg_tcp_dsn, source)
    result = app.test_cli_runner().invoke(args=["reqconn", "activity"])
    assert result.exit_code == 0, result.output
    assert f"application_name {app.config['TEST_APPNAME']!r}" in result.output


def test_storm_pg_oracle_keeps_the_dsns_connect_timeout(pg_tcp_dsn: str) -> None:
    oracle = PgOracle(pg.with_conninfo(pg_tcp_dsn, connect_timeout=7), "nobody", timeout=2.0)
    try:
        assert oracle.read() == 0
        assert oracle.conn is not None
        assert used_connect_timeout(oracle.conn) == "7"
    finally:
        oracle.close()
    oracle = PgOracle(pg_tcp_dsn, "nobody", timeout=2.0)
    try:
        assert oracle.read() == 0
        assert oracle.conn is not None
        assert used_connect_timeout(oracle.conn) == "2"
    finally:
        oracle.close()
