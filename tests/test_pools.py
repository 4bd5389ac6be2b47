"""Named pools and read routing, against two real PostgreSQL servers."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from flask import Blueprint, Flask

from flask_reqconn import (
    ConfigError,
    PoolExhausted,
    ReleaseReason,
    ReqConn,
    ReqConnError,
    get_conn,
    state_of,
)
from flask_reqconn.config import load_config, load_pool_settings
from tests.appfixtures import AppFactory, reqconn_of

#: tells the primary from the replica: a streaming standby shares the primary's
#: system identifier but is in recovery; an independent server differs in both
SERVER_ID = (
    "select system_identifier::text || '/' || pg_is_in_recovery()::text"
    " from pg_control_system()"
)


def server_id(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        return str(conn.execute(SERVER_ID).fetchone()[0])


@pytest.fixture(scope="module")
def ids(pg_dsn: str, replica_dsn: str) -> dict[str, str]:
    found = {"primary": server_id(pg_dsn), "replica": server_id(replica_dsn)}
    assert found["primary"] != found["replica"], "the replica must be another server"
    return found


def stats(app: Flask) -> dict[str, Any]:
    return reqconn_of(app).stats(app)


def pooled_app(make_app: AppFactory, replica_dsn: str, **config: Any) -> Flask:
    pools = config.pop("pools", {"replica": {"CONNINFO": replica_dsn, "MAX_SIZE": 2}})
    return make_app(pools=pools, **config)


# -- configuration -------------------------------------------------------------------


BASE = {"REQCONN_CONNINFO": "postgresql://app@primary/app", "REQCONN_TIMEOUT": 3.0,
        "REQCONN_MIN_SIZE": 2}


@pytest.mark.parametrize(
    ("pools", "key", "fragment"),
    [
        ({"replica": {}}, "REQCONN_POOLS['replica']", "needs its own 'CONNINFO'"),
        ({"replica": {"CONNINFO": "host=r", "MAXSIZE": 3}}, "REQCONN_POOLS['replica']",
         "did you mean 'MAX_SIZE'"),
        ({"replica": {"CONNINFO": "host=r", "MAX_SIZE": 0}},
         "REQCONN_POOLS['replica']['MAX_SIZE']", "at least 1"),
        ({"replica": {"CONNINFO": "host=r", "MAX_SIZE": 1}},  # below the inherited 2 (BASE)
         "REQCONN_POOLS['replica']['MAX_SIZE']", "inherits REQCONN_MIN_SIZE; give it its own"),
        ({"replica": {"CONNINFO": "host=r", "CHECKOUT": "lazy"}}, "REQCONN_POOLS['replica']",
         "unknown pool setting 'CHECKOUT'"),
        ({"default": {"CONNINFO": "host=r"}}, "REQCONN_POOLS", "not a valid pool name"),
        ({"bad name": {"CONNINFO": "host=r"}}, "REQCONN_POOLS", "not a valid pool name"),
        ({"replica": "host=r"}, "REQCONN_POOLS['replica']", "must be a dict"),
    ],
)  # fmt: skip
def test_pool_config_errors_name_the_key(pools: Any, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_pool_settings({**BASE, "REQCONN_POOLS": pools}, "app")
    assert info.value.key == key
    assert fragment in str(info.value)


def test_named_pools_inherit_unset_options() -> None:
    pools = load_pool_settings(
        {**BASE, "REQCONN_POOLS": {"replica": {"CONNINFO": "host=r", "MAX_SIZE": 7}}}, "app"
    )
    assert pools["replica"].max_size == 7
    assert pools["replica"].timeout == 3.0
    assert pools["replica"].application_name == "app"


def test_read_pool_must_exist() -> None:
    with pytest.raises(ConfigError, match="REQCONN_READ_POOL: 'replica' is not a configured"):
        load_config({**BASE, "REQCONN_READ_POOL": "replica"}, "app")


# -- named pools ---------------------------------------------------------------------


def test_a_pool_name_not_configured_is_a_clear_error(make_app: AppFactory) -> None:
    """``get_conn(name)``, ``connection(name)`` and ``add_listener(pool=...)`` name the
    pools there are; the request's own connection is still given back."""
    app = make_app()

    @app.get("/typo")
    def typo() -> str:
        get_conn()
        expected = "no pool named 'replcia'; configured pools: default"
        with pytest.raises(ReqConnError, match=expected):
            get_conn("replcia")
        return "ok"

    assert app.test_client().get("/typo").status_code == 200
    with pytest.raises(ReqConnError, match="no pool named 'replcia'"):
        with reqconn_of(app).connection("replcia", app=app):
            pass
    with pytest.raises(ReqConnError, match="no pool named 'replcia'"):
        state_of(app).add_listener(object(), pool="replcia")  # type: ignore[arg-type]
    assert state_of(app).stats()["checked_out"] == 0


@pytest.mark.slow
def test_named_pool_is_checked_out_lazily_with_every_guarantee(
    make_app: AppFactory, replica_dsn: str, ids: dict[str, str]
) -> None:
    app = pooled_app(make_app, replica_dsn)
    seen: dict[str, Any] = {}

    @app.get("/both")
    def both() -> dict[str, str]:
        from flask import request

        primary = get_conn().execute(SERVER_ID).fetchone()[0]
        leases = request._flask_reqconn.leases
        seen["before"] = set(leases)
        replica = get_conn("replica").execute(SERVER_ID).fetchone()[0]
        assert get_conn("replica") is get_conn("replica")
        # releasing one never touches the other
        leases["replica"].release(ReleaseReason.TEARDOWN)
        assert leases["default"].active
        seen["leases"] = dict(leases)
        return {"primary": primary, "replica": replica}

    @app.get("/primary-only")
    def primary_only() -> str:
        return str(get_conn().execute("select 1").fetchone()[0])

    client = app.test_client()
    assert client.get("/both").get_json() == ids
    assert seen["before"] == {"default"}
    assert client.get("/primary-only").status_code == 200
    s = stats(app)
    assert s["pools"]["default"]["checkouts"] == 2
    assert s["pools"]["replica"]["checkouts"] == 1  # only when asked for
    assert s["checked_out"] == 0
    assert seen["leases"]["default"].released_by is ReleaseReason.TEARDOWN


@pytest.mark.slow
def test_named_pool_exhaustion_answers_503_naming_the_pool(
    make_app: AppFactory, replica_dsn: str
) -> None:
    app = pooled_app(
        make_app, replica_dsn,
        pools={"replica": {"CONNINFO": replica_dsn, "MAX_SIZE": 1, "TIMEOUT": 0.3}},
    )  # fmt: skip
    hold = threading.Event()
    held = threading.Event()
    names: list[str] = []

    @app.errorhandler(PoolExhausted)
    def busy(exc: PoolExhausted) -> tuple[str, int]:
        names.append(exc.pool_name)
        return "busy", 503

    @app.get("/hold")
    def hold_view() -> str:
        get_conn("replica").execute("select 1")
        held.set()
        hold.wait(20)
        return "ok"

    @app.get("/replica")
    def replica() -> str:
        return str(get_conn("replica").execute("select 1").fetchone()[0])

    worker = threading.Thread(target=lambda: app.test_client().get("/hold"))
    worker.start()
    try:
        assert held.wait(20)
        assert app.test_client().get("/replica").status_code == 503
    finally:
        hold.set()
        worker.join(30)
    assert names == ["replica"]
    assert stats(app)["pools"]["replica"]["exhausted"] == 1
    assert stats(app)["pools"]["default"]["exhausted"] == 0


# -- read routing --------------------------------------------------------------------


def routing_app(make_app: AppFactory, replica_dsn: str, **config: Any) -> Flask:
    reqconn = ReqConn()
    reports = Blueprint("reports", __name__)

    @reports.get("/reports/total")
    def total() -> str:
        return str(get_conn().execute(SERVER_ID).fetchone()[0])

    reqconn.read_only(reports)
    app = pooled_app(make_app, replica_dsn, ext=reqconn, **config)

    @app.get("/items")
    @reqconn.read_only
    def items() -> str:
        return str(get_conn().execute(SERVER_ID).fetchone()[0])

    @app.post("/items")
    def add_item() -> str:
        return str(get_conn().execute(SERVER_ID).fetchone()[0])

    @app.get("/sneaky-write")
    @reqconn.read_only
    def sneaky_write() -> str:
        try:
            get_conn().execute("create table should_not_exist (x int)")
        except psycopg.errors.ReadOnlySqlTransaction:
            return "refused"
        return "written"

    app.register_blueprint(reports)
    return app


@pytest.mark.slow
def test_read_only_views_go_to_the_read_pool(
    make_app: AppFactory, replica_dsn: str, ids: dict[str, str]
) -> None:
    app = routing_app(make_app, replica_dsn, read_pool="replica")
    client = app.test_client()
    assert client.get("/items").data.decode() == ids["replica"]
    assert client.get("/reports/total").data.decode() == ids["replica"]
    assert client.post("/items").data.decode() == ids["primary"]
    s = stats(app)
    assert s["pools"]["replica"]["checkouts"] == 2
    assert s["pools"]["default"]["checkouts"] == 1  # no eager checkout for read-only views


@pytest.mark.slow
@pytest.mark.parametrize("transaction", ["rollback", "autocommit"])
def test_read_only_views_cannot_write(
    make_app: AppFactory, replica_dsn: str, transaction: str
) -> None:
    # no read pool: the read-only view runs on the (writable) primary, so the
    # refusal is flask-reqconn's doing, not a standby's
    app = routing_app(make_app, replica_dsn, transaction=transaction, max_size=1)
    client = app.test_client()
    assert client.get("/sneaky-write").data == b"refused"
    # and the connection went back writable for the next request
    assert client.post("/items").status_code == 200
    with reqconn_of(app).connection(app=app) as conn:
        conn.execute("create temp table fine (x int)")
        assert conn.execute("show transaction_read_only").fetchone()[0] == "off"


@pytest.mark.slow
def test_without_a_read_pool_read_only_views_use_the_default_pool_read_only(
    make_app: AppFactory, replica_dsn: str, ids: dict[str, str]
) -> None:
    app = routing_app(make_app, replica_dsn)
    client = app.test_client()
    assert client.get("/items").data.decode() == ids["primary"]
    assert client.get("/sneaky-write").data == b"refused"


@pytest.mark.slow
@pytest.mark.parametrize(("fallback", "expected"), [(True, 200), (False, 503)])
def test_fallback_to_the_primary_when_the_read_pool_is_exhausted(
    make_app: AppFactory, replica_dsn: str, ids: dict[str, str], fallback: bool, expected: int
) -> None:
    app = routing_app(
        make_app, replica_dsn, read_pool="replica", read_fallback=fallback,
        pools={"replica": {"CONNINFO": replica_dsn, "MAX_SIZE": 1, "TIMEOUT": 0.3}},
    )  # fmt: skip
    holder = state_of(app).pools["replica"]
    taken = holder.pool.getconn()  # the read pool's only connection
    try:
        response = app.test_client().get("/items")
        assert response.status_code == expected
        if fallback:
            assert response.data.decode() == ids["primary"]
            assert app.test_client().get("/sneaky-write").data == b"refused"
    finally:
        holder.pool.putconn(taken)
    s = stats(app)
    assert s["pools"]["replica"]["fallbacks"] == (2 if fallback else 0)


@pytest.mark.slow
def test_read_only_pool_option(make_app: AppFactory, replica_dsn: str, pg_dsn: str) -> None:
    # a read-only pool on the writable primary: the refusal is ours
    app = pooled_app(
        make_app, replica_dsn, pools={"reporting": {"CONNINFO": pg_dsn, "READ_ONLY": True}}
    )

    @app.get("/write")
    def write() -> str:
        try:
            get_conn("reporting").execute("create temp table t (x int)")
        except psycopg.errors.ReadOnlySqlTransaction:
            return "refused"
        return "written"

    assert app.test_client().get("/write").data == b"refused"


@pytest.mark.slow
def test_read_only_view_stays_read_only_after_an_explicit_default_checkout(
    make_app: AppFactory, replica_dsn: str, ids: dict[str, str]
) -> None:
    app = routing_app(make_app, replica_dsn, read_pool="replica")
    reqconn = state_of(app).ext

    @app.get("/mixed")
    @reqconn.read_only
    def mixed() -> dict[str, str]:
        primary = get_conn("default").execute(SERVER_ID).fetchone()[0]
        routed = get_conn().execute(SERVER_ID).fetchone()[0]
        return {"primary": primary, "replica": routed}

    assert app.test_client().get("/mixed").get_json() == ids


@pytest.mark.slow
def test_read_only_pool_is_read_only_for_scripts_too(
    make_app: AppFactory, replica_dsn: str, pg_dsn: str
) -> None:
    app = pooled_app(
        make_app, replica_dsn, pools={"reporting": {"CONNINFO": pg_dsn, "READ_ONLY": True}}
    )
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction), \
            reqconn_of(app).connection("reporting", app=app) as conn:  # fmt: skip
        conn.execute("create temp table t (x int)")


def test_transaction_mode_is_per_pool(make_app: AppFactory, pg_dsn: str) -> None:
    import uuid

    table = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(f"create table {table} (pool text)")
    app = make_app(pools={"audit": {"CONNINFO": pg_dsn, "TRANSACTION": "atomic"}})

    @app.post("/write")
    def write() -> str:
        get_conn().execute(f"insert into {table} values ('default')")
        get_conn("audit").execute(f"insert into {table} values ('audit')")
        return "ok"

    assert app.test_client().post("/write").status_code == 200
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(f"select pool from {table}").fetchall()
    assert rows == [("audit",)]  # the atomic pool committed, the default rolled back
