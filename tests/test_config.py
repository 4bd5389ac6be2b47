"""Configuration: read once in init_app, every mistake named by its key."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask

from flask_reqconn import ConfigError, ReqConn, state_of
from flask_reqconn.config import DEFAULTS, load_config
from flask_reqconn.redact import redact_conninfo, scrub_secrets
from tests import pg

GOOD = "postgresql://app@db.example/app"


def settings(**config: Any) -> Any:
    base = {"REQCONN_CONNINFO": GOOD}
    base.update(config)
    _app_settings, pools = load_config(base, "myapp")
    return pools["default"]


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("REQCONN_MIN_SIZE", -1, "at least 0"),
        ("REQCONN_MIN_SIZE", "2", "integer"),
        ("REQCONN_MAX_SIZE", 0, "at least 1"),
        ("REQCONN_MAX_SIZE", True, "integer"),
        ("REQCONN_TIMEOUT", 0, "greater than 0"),
        ("REQCONN_TIMEOUT", "5", "number of seconds"),
        ("REQCONN_MAX_WAITING", -3, "at least 0"),
        ("REQCONN_MAX_LIFETIME", -1.0, "greater than 0"),
        ("REQCONN_MAX_IDLE", None, "number of seconds"),
        ("REQCONN_CHECKOUT", "sometimes", "'eager', 'lazy'"),
        ("REQCONN_TRANSACTION", "commit", "'rollback', 'autocommit', 'atomic'"),
        ("REQCONN_EXEMPT_ENDPOINTS", "static", "list of endpoint names"),
        ("REQCONN_EXEMPT_ENDPOINTS", ["static", 3], "strings"),
        ("REQCONN_RESET_SESSION", "yes", "True or False"),
        ("REQCONN_CHECK_CLIENT", 1, "True or False"),
        ("REQCONN_EOF_MEANS_GONE", None, "True or False"),
        ("REQCONN_CONNECT_ARGS", ["x"], "dict"),
        ("REQCONN_CONNECT_ARGS", {"autocommit": True}, "REQCONN_TRANSACTION"),
        ("REQCONN_SESSION_SETTINGS", {"bad name; drop": 1}, "setting name"),
        ("REQCONN_SESSION_SETTINGS", {"statement_timeout": [1]}, "string, number or bool"),
        ("REQCONN_RETRY_AFTER", 1.5, "integer"),
        ("REQCONN_LEAK_THRESHOLD", -2, "greater than 0"),
        ("REQCONN_LEAK_THRESHOLD", "30", "number of seconds"),
    ],
)
def test_invalid_value_names_the_key(key: str, value: Any, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings(**{key: value})
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")
    assert fragment in str(info.value)


def test_missing_conninfo_says_what_to_set() -> None:
    with pytest.raises(ConfigError, match="REQCONN_CONNINFO: is required"):
        load_config({}, "myapp")


def test_max_size_below_min_size_is_rejected() -> None:
    with pytest.raises(ConfigError, match="REQCONN_MAX_SIZE: must be at least REQCONN_MIN_SIZE"):
        settings(REQCONN_MIN_SIZE=5, REQCONN_MAX_SIZE=2)


def test_unknown_key_is_rejected_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match="REQCONN_MAXSIZE: unknown .*REQCONN_MAX_SIZE"):
        settings(REQCONN_MAXSIZE=3)


def test_invalid_conninfo_fails_without_echoing_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        settings(REQCONN_CONNINFO="host=db password=hunter2secret bogus")
    assert "REQCONN_CONNINFO" in str(info.value)
    assert "hunter2secret" not in str(info.value)
    assert "hunter2secret" not in repr(info.value)


def test_settings_repr_hides_conninfo_and_password() -> None:
    s = settings(
        REQCONN_CONNINFO="postgresql://app:hunter2secret@db/app",
        REQCONN_CONNECT_ARGS={"password": "hunter2secret"},
    )
    assert "hunter2secret" not in repr(s)
    assert "hunter2secret" not in s.safe_conninfo
    assert "***" in s.safe_conninfo


@pytest.mark.parametrize(
    "conninfo",
    [
        "postgresql://app:hunter2secret@db:5432/app",
        "host=db user=app password=hunter2secret dbname=app",
        "host=db password='hunter2 secret' dbname=app",
    ],
)
def test_redact_conninfo_hides_passwords(conninfo: str) -> None:
    redacted = redact_conninfo(conninfo)
    assert "hunter2" not in redacted
    assert "db" in redacted


def test_scrub_secrets_handles_urls_and_key_values() -> None:
    text = "failed: postgresql://u:pw1@h/db and password=pw2 and 'pw3'"
    expected = "failed: postgresql://u:***@h/db and password=*** and '***'"
    assert scrub_secrets(text, ["pw3"]) == expected


def test_session_settings_become_startup_options() -> None:
    s = settings(
        REQCONN_SESSION_SETTINGS={
            "idle_in_transaction_session_timeout": "60s",
            "statement_timeout": 5000,
            "jit": False,
        }
    )
    assert s.connect_args["options"] == (
        "-c idle_in_transaction_session_timeout=60s -c statement_timeout=5000 -c jit=off"
    )


def test_psycopg_connect_arguments_are_accepted() -> None:
    from psycopg.rows import dict_row

    s = settings(REQCONN_CONNECT_ARGS={"prepare_threshold": 2, "row_factory": dict_row})
    assert s.connect_args["prepare_threshold"] == 2


def test_unknown_libpq_option_is_rejected() -> None:
    with pytest.raises(ConfigError, match="REQCONN_CONNECT_ARGS"):
        settings(REQCONN_CONNECT_ARGS={"no_such_option": "1"})


def test_application_name_defaults_to_app_name_but_conninfo_wins() -> None:
    assert settings().application_name == "myapp"
    s = settings(REQCONN_CONNINFO=GOOD + "?application_name=mine")
    assert s.application_name == "mine"


def test_init_app_writes_defaults_and_opens_nothing(pg_dsn: str, pg_admin: Any) -> None:
    appname = pg.unique_name("cfg")
    app = Flask(appname)
    app.config["REQCONN_CONNINFO"] = pg.with_conninfo(pg_dsn, application_name=appname)
    reqconn = ReqConn(app)
    for key, value in DEFAULTS.items():
        if value is not None:
            assert key in app.config
    state = state_of(app)
    assert not state.pools["default"].is_open
    assert pg.app_sessions(pg_admin, appname) == []
    reqconn.close(app)


def test_second_init_app_is_refused() -> None:
    app = Flask("twice")
    app.config["REQCONN_CONNINFO"] = GOOD
    reqconn = ReqConn(app)
    with pytest.raises(RuntimeError, match="already been registered"):
        reqconn.init_app(app)
    with pytest.raises(RuntimeError, match="already been registered"):
        ReqConn(app)


def test_bad_config_fails_at_init_app_before_anything_is_registered() -> None:
    app = Flask("bad")
    app.config["REQCONN_CONNINFO"] = GOOD
    app.config["REQCONN_TIMEOUT"] = -1
    original = app.wsgi_app
    with pytest.raises(ConfigError, match="REQCONN_TIMEOUT"):
        ReqConn().init_app(app)
    assert "reqconn" not in app.extensions
    assert app.wsgi_app == original


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://app@db.example/app?sslmode=require",
        "postgresql+psycopg2://app@db.example/app?sslmode=require",
        "postgresql+asyncpg://app@db.example/app?sslmode=require",
        "postgres+psycopg://app@db.example/app?sslmode=require",
    ],
)
def test_an_sqlalchemy_url_is_read_without_its_driver(url: str) -> None:
    s = settings(REQCONN_CONNINFO=url)
    scheme = url.split("+", 1)[0]
    assert s.conninfo == f"{scheme}://app@db.example/app?sslmode=require"


def test_an_sqlalchemy_url_in_a_named_pool_is_read_without_its_driver() -> None:
    config = {
        "REQCONN_CONNINFO": GOOD,
        "REQCONN_POOLS": {"replica": {"CONNINFO": "postgresql+psycopg://app@replica/app"}},
    }
    assert load_config(config, "myapp")[1]["replica"].conninfo == "postgresql://app@replica/app"


def test_an_sqlalchemy_url_with_sqlalchemy_only_parameters_says_how_it_was_read() -> None:
    with pytest.raises(ConfigError) as info:
        settings(REQCONN_CONNINFO="postgresql+asyncpg://app@db/app?prepared_statement_cache_size=0")
    assert info.value.key == "REQCONN_CONNINFO"
    assert 'invalid URI query parameter: "prepared_statement_cache_size"' in str(info.value)
    assert "SQLAlchemy URL without its '+asyncpg'" in str(info.value)


@pytest.mark.parametrize(
    "url", ["mysql+pymysql://app:pw@db/app", "sqlite:///app.db", "http://db.example/app"]
)
def test_a_url_of_another_database_says_what_to_write(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings(REQCONN_CONNINFO=url)
    assert info.value.key == "REQCONN_CONNINFO"
    scheme = url.split("://", 1)[0]
    assert str(info.value) == (
        f"REQCONN_CONNINFO: is a {scheme!r} URL, not PostgreSQL's: write"
        " 'postgresql://user@host/dbname' or a libpq keyword string"
    )


def test_an_sqlalchemy_url_connects(make_app: Any, pg_dsn: str) -> None:
    if not pg_dsn.startswith("postgresql://"):
        pytest.skip("the test server's conninfo is not a postgresql:// URL")
    app = make_app(conninfo=pg_dsn.replace("postgresql://", "postgresql+psycopg://", 1))
    from flask_reqconn import get_conn

    @app.get("/")
    def index() -> str:
        return str(get_conn().execute("select 1").fetchone()[0])  # type: ignore[index]

    assert app.test_client().get("/").get_data(as_text=True) == "1"


@pytest.mark.parametrize("url", ["postgresql://app:S3cr/3tXX@db/app", "postgresql://app:S3cr@3tXX@db/app"])
def test_a_url_whose_password_libpq_misreads_says_what_to_encode(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings(REQCONN_CONNINFO=url)
    assert str(info.value) == (
        "REQCONN_CONNINFO: is not a valid connection string: libpq misreads the URL (a port"
        " that is not a number, or an '@' in the host): percent-encode '/' and '@' in the"
        " user name and password (%2F, %40)"
    )


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:pa%2Fss%40x@db/app",
        "postgresql://app@db1:5432,db2:5433/app",
        "postgresql://app@%2Ftmp%2Fsock%40dir/app",
        "postgresql:///app?host=@abstract&port=5432",
        "postgresql://app@db/app?application_name=x@y",
        "postgresql://app:p?s#s@db/app",
    ],
)
def test_urls_libpq_reads_as_written_are_accepted(url: str) -> None:
    assert settings(REQCONN_CONNINFO=url).conninfo == url
