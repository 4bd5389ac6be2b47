from __future__ import annotations

from typing import Any

import pytest
from flask import Flask, g, session
from flask.testing import FlaskClient

from flask_reqconn import get_conn
from flaskr.db import reqconn


def test_register(client: FlaskClient, app: Flask) -> None:
    assert client.get("/auth/register").status_code == 200
    response = client.post("/auth/register", data={"username": "a", "password": "a"})
    assert response.headers["Location"] == "/auth/login"
    with app.test_request_context():
        row = get_conn().execute("SELECT * FROM \"user\" WHERE username = 'a'").fetchone()
        assert row is not None and row["username"] == "a"


@pytest.mark.parametrize(
    ("username", "password", "message"),
    [
        ("", "", b"Username is required."),
        ("a", "", b"Password is required."),
        ("test", "test", b"already registered"),
    ],
)
def test_register_validate_input(
    client: FlaskClient, username: str, password: str, message: bytes
) -> None:
    response = client.post("/auth/register", data={"username": username, "password": password})
    assert message in response.data


def test_duplicate_user_is_rolled_back_and_the_request_goes_on(
    client: FlaskClient, app: Flask
) -> None:
    """Recipe "IntegrityError": the INSERT fails at execute() and aborts the transaction;
    after rollback() the same request runs more queries (the page shows the logged-in
    user's menu), and nothing is left to discard at hand-back."""
    before: dict[str, Any] = reqconn.stats(app)
    response = client.post("/auth/register", data={"username": "test", "password": "x"})
    assert response.status_code == 200 and b"already registered" in response.data
    after: dict[str, Any] = reqconn.stats(app)
    assert after["checkouts"] == before["checkouts"] + 1
    assert after["discarded_writes"] == before["discarded_writes"] == 0


def test_login(client: FlaskClient, auth: Any) -> None:
    assert client.get("/auth/login").status_code == 200
    response = auth.login()
    assert response.headers["Location"] == "/"
    with client:
        client.get("/")
        assert session["user_id"] == 1
        assert g.user["username"] == "test"


@pytest.mark.parametrize(
    ("username", "password", "message"),
    [("a", "test", b"Incorrect username."), ("test", "a", b"Incorrect password.")],
)
def test_login_validate_input(
    auth: Any, username: str, password: str, message: bytes
) -> None:
    response = auth.login(username, password)
    assert message in response.data


def test_logout(client: FlaskClient, auth: Any) -> None:
    auth.login()
    with client:
        auth.logout()
        assert "user_id" not in session
