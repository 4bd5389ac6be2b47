"""The SQLAlchemy page matches the code: its quoted errors are raised, its recipes run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from flask import Flask
from psycopg.conninfo import conninfo_to_dict

from flask_reqconn import ReqConn, ReqConnError, state_of
from flask_reqconn.integrations.sqlalchemy import RequestPool, create_engine

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "sqlalchemy.rst").read_text()


def section(start: str, end: str) -> str:
    return PAGE.split(start, 1)[1].split(end, 1)[0]


def code_blocks(text: str) -> list[str]:
    """The Python code blocks of *text*, dedented."""
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", text)
    return [re.sub(r"^    ", "", block, flags=re.M) for block in blocks]


def test_the_quoted_error_of_an_engine_outside_an_app_context_is_raised() -> None:
    quoted = re.search(r"``(ReqConnError: this SQLAlchemy engine .*?)``", PAGE, re.S)
    assert quoted is not None
    with pytest.raises(ReqConnError) as caught, create_engine().connect():
        pass
    said = " ".join(quoted.group(1).split()).removeprefix("ReqConnError: ")
    assert str(caught.value).startswith(said)


def test_the_database_url_recipe_runs_on_an_sqlalchemy_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (recipe,) = code_blocks(section("The database URL\n", "Alchemical and other"))
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://app:s3cret@db.internal:6432/app"
                       "?sslmode=require&application_name=api")  # fmt: skip
    scope: dict[str, object] = {}
    exec(compile(recipe, "docs/sqlalchemy.rst", "exec"), scope)
    config = scope["Config"]
    assert config.SQLALCHEMY_ENGINE_OPTIONS == {"poolclass": RequestPool}  # type: ignore[attr-defined]
    app = Flask("recipe")
    app.config.from_object(config)
    ReqConn(app)  # accepted as it is
    conninfo = state_of(app).pools["default"].settings.conninfo
    assert conninfo_to_dict(conninfo) == {
        "user": "app", "password": "s3cret", "host": "db.internal", "port": "6432",
        "dbname": "app", "sslmode": "require", "application_name": "api",
    }  # fmt: skip


def test_the_alchemical_recipe_keeps_the_other_engine_options(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (recipe,) = code_blocks(section("Alchemical and other libraries\n", "Alembic\n"))
    monkeypatch.setenv("DATABASE_URL", "postgresql://app@db.internal/app")
    scope: dict[str, object] = {"os": __import__("os")}
    exec("from flask_reqconn.integrations.sqlalchemy import engine_options\n" + recipe, scope)
    config = scope["Config"]
    assert config.ALCHEMICAL_ENGINE_OPTIONS == {"poolclass": RequestPool, "echo": False}  # type: ignore[attr-defined]
    create_engine(config.ALCHEMICAL_DATABASE_URL, echo=False)  # type: ignore[attr-defined]
