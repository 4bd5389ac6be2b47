"""Rows by name for the whole app (``REQCONN_CONNECT_ARGS = {"row_factory": dict_row}``)
cost no correctness: hand-back, the write check and read-only connections work with it."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from flask import Flask

from flask_reqconn import get_conn, testing
from flaskr import create_app
from flaskr.db import reqconn


def _backend(app: Flask) -> int:
    with app.test_request_context():
        row = get_conn().execute("SELECT pg_backend_pid() AS pid").fetchone()
    assert row is not None
    return int(row["pid"])


def test_hand_back_keeps_the_connection_and_warns_nothing(
    flaskr_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    # a pool of one (the config is read at init_app): the same backend every time
    app = create_app({"TESTING": True, "REQCONN_CONNINFO": flaskr_dsn, "REQCONN_MAX_SIZE": 1})
    with testing.closing(app), caplog.at_level(logging.WARNING, logger="flask_reqconn"):
        first = _backend(app)
        assert _backend(app) == first  # cleaned and reused, not discarded
        stats: dict[str, Any] = reqconn.stats(app)
    assert stats["pools"]["default"]["discarded_connections"] == 0
    assert [r.getMessage() for r in caplog.records if r.name.startswith("flask_reqconn")] == []


def test_forgotten_writes_are_rolled_back_and_counted(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="flask_reqconn"):
        with app.test_request_context("/forgot"):
            get_conn().execute("UPDATE post SET title = 'never committed'")
    assert reqconn.stats(app)["discarded_writes"] == 1
    assert "rolled back uncommitted writes" in caplog.text
    with app.test_request_context():
        row = get_conn().execute("SELECT title FROM post").fetchone()
    assert row == {"title": "test title"}


def test_rows_come_back_by_name_everywhere(app: Flask) -> None:
    with app.test_request_context():
        assert get_conn().execute("SELECT 1 AS one").fetchone() == {"one": 1}
    with app.app_context(), reqconn.connection() as conn:
        assert conn.execute("SELECT 2 AS two").fetchone() == {"two": 2}
