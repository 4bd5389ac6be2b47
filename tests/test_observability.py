"""Leak detection, stats, health endpoints, Prometheus metrics and the CLI."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from typing import Any

import pytest
from flask import Flask
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from flask_reqconn import ConfigError, ReqConn, get_conn, state_of
from flask_reqconn.integrations.prometheus import PrometheusMetrics
from flask_reqconn.stats import BUCKETS
from tests import pg
from tests.appfixtures import AppFactory, reqconn_of


def stats(app: Flask) -> dict[str, Any]:
    return reqconn_of(app).stats(app)


def messages(caplog: pytest.LogCaptureFixture, fragment: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if fragment in r.getMessage()]


# -- leak detection -------------------------------------------------------------


def test_leak_threshold_is_validated(make_app: AppFactory) -> None:
    with pytest.raises(ConfigError, match="REQCONN_LEAK_THRESHOLD"):
        make_app(leak_threshold=-1)
    with pytest.raises(ConfigError, match="REQCONN_LEAK_THRESHOLD"):
        make_app(leak_threshold="5s")


def test_lease_held_past_the_threshold_warns_once_then_says_it_came_back(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(leak_threshold=0.3, checkout="lazy")
    seen: dict[str, Any] = {}

    @app.get("/report")
    def report() -> str:
        conn = get_conn()  # lazy: the site is this line
        conn.execute("select pg_sleep(1.2)")
        return "done"

    def watch_holders() -> None:
        def holding() -> Any:
            holders = stats(app)["pools"]["default"]["holders"]
            return holders if holders and holders[0]["held_for"] > 0.1 else None

        seen["holders"] = pg.wait_until(holding, timeout=20, interval=0.02)

    watcher = threading.Thread(target=watch_holders)
    with caplog.at_level("WARNING", logger="flask_reqconn"):
        watcher.start()
        assert app.test_client().get("/report").status_code == 200
        watcher.join(30)
    warnings = messages(caplog, "threshold 0.3 s")
    assert len(warnings) == 1, warnings
    assert "GET /report" in warnings[0] and "endpoint 'report'" in warnings[0]
    assert "test_observability.py" in warnings[0] and "in report" in warnings[0]
    back = messages(caplog, "came back after")
    assert len(back) == 1 and "GET /report" in back[0]
    holder = seen["holders"][0]
    assert holder["endpoint"] == "report" and holder["path"] == "/report"
    assert "test_observability.py" in (holder["checkout_site"] or "")
    s = stats(app)
    assert s["leak_warnings"] == 1 and s["pools"]["default"]["leak_warnings"] == 1


def test_eager_checkout_site_names_the_view(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(leak_threshold=0.2)

    @app.get("/slow")
    def slow_view() -> str:
        get_conn().execute("select pg_sleep(0.8)")
        return "ok"

    with caplog.at_level("WARNING", logger="flask_reqconn"):
        app.test_client().get("/slow")
    warnings = messages(caplog, "threshold 0.2 s")
    assert len(warnings) == 1
    assert "slow_view (view, eager checkout)" in warnings[0]


class _AppMiddleware:
    """WSGI middleware of the app's own, around ``wsgi_app``: app code on the stack of
    every hook, though not the code that uses the connection."""

    def __init__(self, wsgi_app: Any) -> None:
        self.wsgi_app = wsgi_app

    def __call__(self, environ: Any, start_response: Any) -> Any:
        return self.wsgi_app(environ, start_response)


def test_eager_checkout_site_is_the_view_whatever_app_code_is_around_it(
    make_app: AppFactory,
) -> None:
    """The app's package is this test's (so the test and the middleware are app code,
    up the stack of the eager checkout): the site is still the view."""
    app = make_app(leak_threshold=30)
    app.import_name = __name__
    app.wsgi_app = _AppMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    seen: list[Any] = []

    @app.get("/held")
    def held_view() -> str:
        seen.append(stats(app)["pools"]["default"]["holders"])
        return "ok"

    for _ in range(2):  # the second from what the first found
        assert app.test_client().get("/held").status_code == 200
    code = held_view.__code__
    view = f"{code.co_filename}:{code.co_firstlineno} in {held_view.__qualname__}"
    sites = [holders[0]["checkout_site"] for holders in seen]
    assert sites == [f"{view} (view, eager checkout)"] * 2


def test_leak_detection_keeps_no_view_of_an_app_that_is_gone(pg_dsn: str) -> None:
    """Test suites make an app per test: what a checkout site remembers of a view must
    not keep the view, or the app its closure refers to, alive."""
    app = Flask(pg.unique_name("rc"))
    app.config.update(REQCONN_CONNINFO=pg_dsn, REQCONN_MIN_SIZE=0, REQCONN_LEAK_THRESHOLD=30)
    reqconn = ReqConn(app)

    @app.get("/")
    def index() -> str:
        return str(get_conn().execute("select 1").fetchone()[0])

    assert app.test_client().get("/").status_code == 200
    reqconn.close(app)
    gone = weakref.ref(index)
    del index, app, reqconn
    gc.collect()
    assert gone() is None


class _SlottedView:
    """A view that cannot be referenced weakly: a callable object with slots."""

    __slots__ = ()

    def __call__(self) -> str:
        return str(get_conn().execute("select 1").fetchone()[0])


@pytest.mark.parametrize("checkout", ["eager", "lazy"])
def test_leak_detection_takes_views_that_cannot_be_referenced_weakly(
    make_app: AppFactory, checkout: str
) -> None:
    app = make_app(leak_threshold=30, checkout=checkout)
    app.add_url_rule("/", "slotted", _SlottedView())
    for _ in range(2):
        assert app.test_client().get("/").status_code == 200


def test_fast_requests_never_warn(make_app: AppFactory, caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(leak_threshold=5)

    @app.get("/")
    def index() -> str:
        return str(get_conn().execute("select 1").fetchone()[0])

    with caplog.at_level("WARNING", logger="flask_reqconn"):
        for _ in range(20):
            app.test_client().get("/")
    assert not messages(caplog, "threshold")
    assert stats(app)["leak_warnings"] == 0


# -- stats ---------------------------------------------------------------------------


def test_stats_shape_is_stable(make_app: AppFactory) -> None:
    app = make_app()

    @app.get("/")
    def index() -> str:
        return str(get_conn().execute("select 1").fetchone()[0])

    app.test_client().get("/")
    s = stats(app)
    assert set(s) == {
        "pid", "checked_out", "checkouts", "releases", "exhausted", "refused", "client_gone",
        "stalled",
        "discarded_writes", "discarded_connections", "finalized", "leak_warnings",
        "cancelled", "reclaimed", "fallbacks", "dead_discarded", "connection_lost", "pools",
    }  # fmt: skip
    pool = s["pools"]["default"]
    assert set(pool) == {
        "checked_out", "checkouts", "releases", "exhausted", "refused", "discarded_writes",
        "discarded_connections", "finalized", "leak_warnings", "client_gone", "stalled",
        "cancelled", "reclaimed", "fallbacks", "dead_discarded", "connection_lost",
        "wait_time", "hold_time", "holders", "refusing", "pool",
    }  # fmt: skip
    assert pool["refusing"] is None
    assert set(pool["releases"]) == {
        "teardown", "close", "abort", "exception", "client_gone", "finalizer"
    }
    for hist in (pool["wait_time"], pool["hold_time"]):
        assert hist["count"] == 1
        assert list(hist["buckets"]) == [*map(str, BUCKETS), "+Inf"]
        assert hist["buckets"]["+Inf"] == 1
    assert {"pool_size", "pool_available", "requests_waiting", "pool_max"} <= set(pool["pool"])


# -- health --------------------------------------------------------------------------


def test_health_answers_while_the_pool_is_taken_and_ready_says_503(
    make_app: AppFactory,
) -> None:
    app = make_app(max_size=1, timeout=5)
    reqconn = reqconn_of(app)
    app.register_blueprint(reqconn.health_blueprint(), url_prefix="/_")
    started = threading.Event()
    release = threading.Event()

    @app.get("/hold")
    def hold() -> str:
        get_conn().execute("select 1")
        started.set()
        release.wait(30)
        return "ok"

    client = app.test_client()
    assert client.get("/_/ready").get_json()["status"] == "ok"
    holder = threading.Thread(target=lambda: app.test_client().get("/hold"))
    holder.start()
    try:
        assert started.wait(20)
        health = client.get("/_/health")
        assert health.status_code == 200 and health.get_json() == {"status": "ok"}
        ready = client.get("/_/ready")
        assert ready.status_code == 503
        assert ready.get_json()["reason"] == "pool exhausted"
        assert ready.get_json()["checked_out"] == 1
        assert client.get("/_/stats").get_json()["checked_out"] == 1
    finally:
        release.set()
        holder.join(30)
    assert client.get("/_/ready").status_code == 200
    s = stats(app)
    assert s["checkouts"] == 1  # only /hold: the probes are exempt from request checkout


def test_ready_says_503_when_the_database_is_down(make_app: AppFactory) -> None:
    import dataclasses

    app = make_app(timeout=1)
    holder = state_of(app).pools["default"]
    holder.settings = dataclasses.replace(holder.settings, conninfo="host=127.0.0.1 port=1")
    app.register_blueprint(reqconn_of(app).health_blueprint())
    response = app.test_client().get("/ready")
    assert response.status_code == 503
    assert app.test_client().get("/health").status_code == 200


# -- metrics -------------------------------------------------------------------------


def test_metrics_parse_and_carry_the_documented_names(make_app: AppFactory) -> None:
    app = make_app(max_size=1, timeout=0.3)
    PrometheusMetrics(CollectorRegistry()).init_app(app)

    @app.get("/")
    def index() -> str:
        return str(get_conn().execute("select 1").fetchone()[0])

    client = app.test_client()
    for _ in range(3):
        assert client.get("/").status_code == 200
    text = client.get("/metrics").get_data(as_text=True)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "flask_reqconn_checkouts", "flask_reqconn_releases", "flask_reqconn_pool_exhausted",
        "flask_reqconn_client_gone", "flask_reqconn_leak_warnings",
        "flask_reqconn_checkout_wait_seconds", "flask_reqconn_hold_seconds",
        "flask_reqconn_checked_out", "flask_reqconn_pool_size", "flask_reqconn_pool_waiting",
    ):  # fmt: skip
        assert name in families, sorted(families)

    def value(family: str, sample: str, **labels: str) -> float:
        for s in families[family].samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
        raise AssertionError(f"no {sample} {labels}")

    assert value("flask_reqconn_checkouts", "flask_reqconn_checkouts_total", pool="default") == 3
    assert value("flask_reqconn_releases", "flask_reqconn_releases_total",
                 reason="teardown") == 3  # fmt: skip
    assert value("flask_reqconn_checked_out", "flask_reqconn_checked_out") == 0
    assert value("flask_reqconn_hold_seconds", "flask_reqconn_hold_seconds_count") == 3
    # every series of the pool is there from the start, at 0: a rate sees the first event
    assert value("flask_reqconn_pool_exhausted", "flask_reqconn_pool_exhausted_total",
                 pool="default") == 0  # fmt: skip
    assert value("flask_reqconn_releases", "flask_reqconn_releases_total", reason="abort") == 0


@pytest.mark.slow
def test_metrics_add_up_across_gunicorn_workers(
    spawn: Any, pg_dsn: str, tmp_path: Any
) -> None:
    appname = pg.unique_name("prom")
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    server = spawn(
        "gunicorn", "tests.apps.metrics_app:create_app()", workers=2,
        extra_args=("--config", "python:tests.apps.metrics_app"),
        env={"RC_DSN": pg_dsn, "RC_APPNAME": appname, "PROMETHEUS_MULTIPROC_DIR": str(prom_dir)},
    )  # fmt: skip
    from tests import servers

    requests = 40
    workers: set[int] = set()
    lock = threading.Lock()

    def client(_: int) -> None:
        for _ in range(requests // 4):
            status, _, body = servers.http_get(server.url + "/pid?s=0.05")
            assert status == 200
            with lock:
                workers.add(int(body))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    # 4 concurrent clients on 2 sync workers that each serve one request at a time
    assert len(workers) == 2
    for _ in range(4):  # whichever worker answers, the totals are the same
        _, _, text = servers.http_get(server.url + "/metrics")
        totals = {
            s.name: s.value
            for f in text_string_to_metric_families(text.decode())
            for s in f.samples
            if s.name == "flask_reqconn_checkouts_total"
        }
        assert totals == {"flask_reqconn_checkouts_total": requests}


# -- CLI -----------------------------------------------------------------------------


def test_cli_check_reports_settings_and_fits(make_app: AppFactory) -> None:
    app = make_app(max_size=2)
    result = app.test_cli_runner().invoke(args=["reqconn", "check", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "server version:" in result.output
    assert "max_connections:" in result.output
    assert "statement_timeout:" in result.output
    assert "idle_in_transaction_session_timeout:" in result.output
    assert "max_size 2 x 2 worker(s)" in result.output
    assert result.output.rstrip().endswith("ok")


def test_cli_check_warns_when_workers_times_pool_exceed_the_server(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(max_size=50)
    monkeypatch.setenv("WEB_CONCURRENCY", "100")
    result = app.test_cli_runner().invoke(args=["reqconn", "check"])
    assert result.exit_code == 1
    assert "100 workers x REQCONN_MAX_SIZE 50" in result.output


def test_cli_check_fails_clearly_without_a_server(make_app: AppFactory) -> None:
    app = make_app(timeout=0.5)
    import dataclasses

    holder = state_of(app).pools["default"]
    holder.settings = dataclasses.replace(
        holder.settings, conninfo="postgresql://u:hunter2secret@127.0.0.1:1/db"
    )
    result = app.test_cli_runner().invoke(args=["reqconn", "check"])
    assert result.exit_code == 1
    assert "cannot connect" in result.output
    assert "hunter2secret" not in result.output


@pytest.mark.parametrize("row_factory", ["tuple_row", "dict_row"])
def test_cli_activity_groups_sessions_and_flags_idle_in_transaction(
    make_app: AppFactory, pg_dsn: str, row_factory: str
) -> None:
    import psycopg
    from psycopg import rows

    app = make_app(connect_args={"row_factory": getattr(rows, row_factory)})

    with psycopg.connect(
        pg.with_conninfo(pg_dsn, application_name=app.config["TEST_APPNAME"])
    ) as stuck:
        stuck.execute("select 1")  # leaves a transaction open
        time.sleep(0.3)
        result = app.test_cli_runner().invoke(
            args=["reqconn", "activity", "--idle-threshold", "0.1"]
        )
    assert result.exit_code == 0, result.output
    assert "idle in transaction" in result.output
    assert "WARNING: pid" in result.output and "select 1" in result.output
