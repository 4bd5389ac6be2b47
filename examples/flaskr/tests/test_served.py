"""flaskr under a real gunicorn: an abort storm leaks nothing; 499s are logged at INFO
only once the app configures logging."""

from __future__ import annotations

from pathlib import Path

import pytest

from flask_reqconn import testing
from flask_reqconn.storm import StormConfig, run_storm
from flask_reqconn.testing.pytest_plugin import GunicornFactory

FLASKR = Path(__file__).resolve().parent.parent


def _serve(serve_gunicorn: GunicornFactory, dsn: str, appname: str, **env: str):  # type: ignore[no-untyped-def]
    server = serve_gunicorn(
        "flaskr:create_app()",
        env={"DATABASE_URL": dsn, "FLASKR_APPNAME": appname, "SECRET_KEY": "t", **env},
        cwd=FLASKR,
    )
    testing.run_sql_file(dsn, FLASKR / "flaskr" / "schema.sql")
    testing.run_sql_file(dsn, FLASKR / "tests" / "data.sql")
    return server


def test_storm_against_flaskr_leaks_no_connection(
    serve_gunicorn: GunicornFactory, flaskr_dsn: str
) -> None:
    appname = testing.unique_name("flaskr_storm")
    server = _serve(serve_gunicorn, flaskr_dsn, appname)
    result = run_storm(
        StormConfig(
            server.url + "/",
            normal_count=40,
            normal_concurrency=4,
            abort_count=40,
            abort_concurrency=4,
            health_path="/health",
            final_count=20,
            final_concurrency=4,
            stats_url="/stats",
            dsn=flaskr_dsn,
            application_name=appname,
            max_seconds=90.0,
        )
    )
    assert result.ok, result.verdict
    readings = {r.source: r for r in result.leaks}
    assert readings["stats"].at_end == 0 and readings["pg"].at_end == 0, result.leaks
    assert result.final.statuses.get(200) == 20


def _aborted_requests_answered_499(server: testing.ServerProcess) -> int:
    for _ in range(20):
        testing.send_and_close(server.url, "/")  # the client leaves at once
    stats = testing.wait_until(
        lambda: (s := testing.get_json(server.url + "/stats"))["client_gone"] and s,
        timeout=30,
        message="aborted requests counted as 499",
    )
    return int(stats["client_gone"])


@pytest.mark.parametrize("level", [None, "INFO"])
def test_499_info_lines_appear_once_logging_is_configured(
    serve_gunicorn: GunicornFactory, flaskr_dsn: str, level: str | None
) -> None:
    """Recipe: the library configures no logging, so its INFO lines (one per 499) show
    only when the app sets a level."""
    env = {"FLASKR_LOG_LEVEL": level} if level else {}
    server = _serve(serve_gunicorn, flaskr_dsn, testing.unique_name("flaskr_log"), **env)
    assert _aborted_requests_answered_499(server) > 0
    logged = "client gone before its connection was used" in server.log_text()
    assert logged is (level is not None), server.log_tail()
