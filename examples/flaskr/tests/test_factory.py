from __future__ import annotations

import pytest
from psycopg.rows import dict_row

from flaskr import create_app


def test_config_from_the_environment(monkeypatch: pytest.MonkeyPatch, flaskr_dsn: str) -> None:
    """Recipe "create_app() with config from the environment"."""
    monkeypatch.setenv("DATABASE_URL", flaskr_dsn)
    monkeypatch.setenv("SECRET_KEY", "from-env")
    monkeypatch.setenv("FLASKR_APPNAME", "flaskr_env")
    app = create_app()
    assert not app.testing
    assert app.config["SECRET_KEY"] == "from-env"
    assert "application_name=flaskr_env" in app.config["REQCONN_CONNINFO"]
    assert app.config["REQCONN_CONNECT_ARGS"] == {"row_factory": dict_row}
    assert create_app({"TESTING": True}).testing


def test_a_missing_database_url_fails_at_create_app(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(Exception, match="REQCONN_CONNINFO"):
        create_app()
