"""flaskr's fixtures, on flask-reqconn's pytest plugin (``pg_dsn``, ``pg_admin``, ...)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from werkzeug.test import TestResponse

from flask_reqconn import testing
from flaskr import create_app
from flaskr.db import init_db

pytest_plugins = ["flask_reqconn.testing.pytest_plugin"]

DATA_SQL = Path(__file__).with_name("data.sql")


@pytest.fixture(scope="session")
def flaskr_dsn(pg_dsn: str, pg_admin: psycopg.Connection[Any]) -> Iterator[str]:
    """A database of flaskr's own on the test server, for the session."""
    name = testing.create_database(pg_admin, "flaskr")
    try:
        yield testing.with_conninfo(pg_dsn, dbname=name)
    finally:
        testing.drop_database(pg_admin, name)


@pytest.fixture
def app(flaskr_dsn: str) -> Iterator[Flask]:
    """A fresh app with fresh tables and the test data; its pools closed at teardown."""
    app = create_app({"TESTING": True, "REQCONN_CONNINFO": flaskr_dsn})
    with testing.closing(app):  # checks nothing is left checked out, closes the pool
        with app.app_context():
            init_db()
        testing.run_sql_file(flaskr_dsn, DATA_SQL)
        yield app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def runner(app: Flask) -> FlaskCliRunner:
    return app.test_cli_runner()


class AuthActions:
    def __init__(self, client: FlaskClient) -> None:
        self._client = client

    def login(self, username: str = "test", password: str = "test") -> TestResponse:
        return self._client.post(
            "/auth/login", data={"username": username, "password": password}
        )

    def logout(self) -> TestResponse:
        return self._client.get("/auth/logout")


@pytest.fixture
def auth(client: FlaskClient) -> AuthActions:
    return AuthActions(client)
