from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from flask_reqconn import get_conn


def test_index(client: FlaskClient, auth: Any) -> None:
    response = client.get("/")
    assert b"Log In" in response.data
    assert b"Register" in response.data
    auth.login()
    response = client.get("/")
    assert b"test title" in response.data
    assert b"by test on 2018-01-01" in response.data
    assert b"test\nbody" in response.data
    assert b'href="/1/update"' in response.data


@pytest.mark.parametrize("path", ["/create", "/1/update", "/1/delete"])
def test_login_required(client: FlaskClient, path: str) -> None:
    response = client.post(path)
    assert response.headers["Location"] == "/auth/login"


def test_author_required(app: Flask, client: FlaskClient, auth: Any) -> None:
    with app.test_request_context():
        conn = get_conn()
        conn.execute("UPDATE post SET author_id = 2 WHERE id = 1")
        conn.commit()
    auth.login()
    assert client.post("/1/update").status_code == 403
    assert client.post("/1/delete").status_code == 403
    assert b'href="/1/update"' not in client.get("/").data


@pytest.mark.parametrize("path", ["/2/update", "/2/delete"])
def test_exists_required(client: FlaskClient, auth: Any, path: str) -> None:
    auth.login()
    assert client.post(path).status_code == 404


def _count_posts(app: Flask) -> int:
    with app.test_request_context():
        row = get_conn().execute("SELECT count(id) AS n FROM post").fetchone()
    assert row is not None
    return int(row["n"])


def test_create(client: FlaskClient, auth: Any, app: Flask) -> None:
    auth.login()
    assert client.get("/create").status_code == 200
    client.post("/create", data={"title": "created", "body": ""})
    assert _count_posts(app) == 2


def test_update(client: FlaskClient, auth: Any, app: Flask) -> None:
    auth.login()
    assert client.get("/1/update").status_code == 200
    client.post("/1/update", data={"title": "updated", "body": ""})
    with app.test_request_context():
        post = get_conn().execute("SELECT * FROM post WHERE id = 1").fetchone()
    assert post is not None and post["title"] == "updated"


@pytest.mark.parametrize("path", ["/create", "/1/update"])
def test_create_update_validate(client: FlaskClient, auth: Any, path: str) -> None:
    auth.login()
    response = client.post(path, data={"title": "", "body": ""})
    assert b"Title is required." in response.data


def test_delete(client: FlaskClient, auth: Any, app: Flask) -> None:
    auth.login()
    response = client.post("/1/delete")
    assert response.headers["Location"] == "/"
    assert _count_posts(app) == 0
