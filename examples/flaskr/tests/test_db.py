from __future__ import annotations

from typing import Any

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskCliRunner

from flask_reqconn import ConnectionReleased, get_conn, testing
from flaskr.db import reqconn


def test_the_request_connection_is_back_after_the_request(app: Flask) -> None:
    """Flask's tutorial checks that its sqlite connection is closed after the request. A
    pooled connection is never closed: it goes back to the pool, and strict mode makes a
    kept reference fail loudly instead of running on a connection someone else may use."""
    with testing.strict():
        with app.test_request_context("/"):  # recipe: get_conn() outside a real request
            conn = get_conn()
            assert conn.execute("SELECT 1 AS one").fetchone() == {"one": 1}
            assert get_conn() is conn
        with pytest.raises(ConnectionReleased, match="already handed back"):
            conn.execute("SELECT 1")
    testing.assert_no_checkouts(app)


def test_reqconn_connection_outside_requests(app: Flask) -> None:
    """Recipe "code outside requests": ``reqconn.connection()`` commits on success."""
    with app.app_context():
        with reqconn.connection() as conn:
            conn.execute("UPDATE post SET title = 'from a script'")
        with reqconn.connection() as conn:
            row = conn.execute("SELECT title FROM post").fetchone()
    assert row == {"title": "from a script"}


def test_init_db_command(runner: FlaskCliRunner, app: Flask, flaskr_dsn: str) -> None:
    """Recipe "an init-db command running a schema file"."""
    result = runner.invoke(args=["init-db"])
    assert result.exit_code == 0, result.output
    assert "Initialized" in result.output
    with psycopg.connect(flaskr_dsn) as conn:  # the data is gone, the tables are there
        counts: Any = conn.execute('SELECT (SELECT count(*) FROM "user"), count(*) FROM post')
        assert counts.fetchone() == (0, 0)
