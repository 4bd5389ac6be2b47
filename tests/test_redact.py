"""No password in any error, nor any piece of one, whatever form the conninfo takes.

libpq echoes part of a conninfo it cannot parse; the messages built from its errors must
hide what may be a password even then. Each case gives a config and the passwords in it (as
written, and as the user meant it); no run of three characters of any of them may appear in
the error's ``str``, its ``repr``, its formatted traceback (chained exceptions included) or
the log.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

import pytest

from flask_reqconn import ConfigError
from flask_reqconn.config import load_config
from flask_reqconn.redact import redact_conninfo, scrub_conninfo_error

SPACED = "S3cr3t XX"
#: id -> (REQCONN_CONNINFO, extra config, the passwords)
CASES: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "url-space-and-bad-option": ("postgresql://u:S3cr3t XX@db/app?bogus=1", {}, (SPACED,)),
    "url-space": ("postgresql://u:S3cr3t XX@db/app", {}, (SPACED,)),
    "url-space-ipv6": ("postgresql://u:S3cr3t XX@[::1/app", {}, (SPACED,)),
    "url-percent-space": ("postgresql://u:S3cr3t%20XX@db/app?bogus=1", {}, ("S3cr3t%20XX", SPACED)),
    "url-bad-percent": ("postgresql://u:S3cr%ZZ3tXX@db/app", {}, ("S3cr%ZZ3tXX",)),
    "url-percent-nul": ("postgresql://u:S3cr3t%00XX@db/app", {}, ("S3cr3t%00XX",)),
    "url-at-in-password": ("postgresql://u:S3cr@t XX@db/app", {}, ("S3cr@t XX",)),
    "sqlalchemy-url-space": ("postgresql+psycopg://u:S3cr3t XX@db/app", {}, (SPACED,)),
    "sqlalchemy-url-bad-option": ("postgresql+psycopg2://u:S3cr3tXX@db/app?x=1", {}, ("S3cr3tXX",)),
    "other-database-url": ("mysql+pymysql://u:S3cr3t XX@db/app", {}, (SPACED,)),
    "url-slash-in-password": ("postgresql://u:S3cr/3tXXXX@db/app", {}, ("S3cr/3tXXXX",)),
    "url-at-in-password-parsable": ("postgresql://u:S3cr3t@XXXX@db/app", {}, ("S3cr3t@XXXX",)),
    "query-space": ("postgresql://u@db/app?password=S3cr3t XX", {}, (SPACED,)),
    "query-space-then-bad": ("postgresql://u@db/app?password=S3cr3t XX&bogus=1", {}, (SPACED,)),
    "query-bad-percent": ("postgresql://u@db/app?password=S3cr3t%ZZXX", {}, ("S3cr3t%ZZXX",)),
    "query-first": ("postgresql://u@db/app?bogus=1&password=S3cr3t XX", {}, (SPACED,)),
    "keyword-quoted-bad-option": ("host=db password='S3cr3t XX' bogus=1", {}, (SPACED,)),
    "keyword-quoted-unterminated": ("host=db password='S3cr3t XX", {}, (SPACED,)),
    "keyword-quoted-escaped": (r"host=db password='S3cr3t \' XX' bogus", {}, ("S3cr3t ' XX",)),
    "keyword-unquoted-space": ("host=db password=S3cr3t XXXX", {}, ("S3cr3t XXXX",)),
    "keyword-unquoted-space-then-more": (
        "host=db password=S3cr3t XXXX port=5432",
        {},
        ("S3cr3t XXXX",),
    ),
    "connect-args-password": (
        "host=db bogus",
        {"REQCONN_CONNECT_ARGS": {"password": SPACED}},
        (SPACED,),
    ),
    "connect-args-bad-option": (
        "postgresql://u:S3cr3tXX@db/app",
        {"REQCONN_CONNECT_ARGS": {"password": SPACED, "no_such_option": "S3cr3tXX"}},
        ("S3cr3tXX", SPACED),
    ),
}


def pieces(passwords: tuple[str, ...]) -> set[str]:
    """Every run of three characters of each password."""
    return {p[i : i + 3] for p in passwords for i in range(len(p) - 2)}


def leaked(text: str, passwords: tuple[str, ...]) -> list[str]:
    return sorted(piece for piece in pieces(passwords) if piece in text)


def load_error(config: dict[str, Any], caplog: pytest.LogCaptureFixture) -> tuple[ConfigError, str]:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConfigError) as info:
        load_config(config, "myapp")
    error = info.value
    text = "\n".join(
        [str(error), repr(error), "".join(traceback.format_exception(error)), caplog.text]
    )
    return error, text


@pytest.mark.parametrize("case", CASES)
def test_no_piece_of_a_password_in_a_conninfo_error(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    conninfo, extra, passwords = CASES[case]
    error, text = load_error({"REQCONN_CONNINFO": conninfo, **extra}, caplog)
    assert error.key in ("REQCONN_CONNINFO", "REQCONN_CONNECT_ARGS")
    assert leaked(text, passwords) == [], text


@pytest.mark.parametrize("case", CASES)
def test_no_piece_of_a_password_in_a_named_pools_conninfo_error(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    conninfo, extra, passwords = CASES[case]
    spec = {"CONNINFO": conninfo, **{k.removeprefix("REQCONN_"): v for k, v in extra.items()}}
    config = {"REQCONN_CONNINFO": "postgresql://app@db/app", "REQCONN_POOLS": {"replica": spec}}
    error, text = load_error(config, caplog)
    assert error.key.startswith("REQCONN_POOLS['replica']")
    assert leaked(text, passwords) == [], text


def test_the_error_still_says_what_is_wrong() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"REQCONN_CONNINFO": "postgresql://u:S3cr3t XX@db/app"}, "myapp")
    assert str(info.value) == (
        'REQCONN_CONNINFO: is not a valid connection string: unexpected spaces found in "***",'
        " use percent-encoded spaces (%20) instead"
    )
    with pytest.raises(ConfigError) as info:
        load_config({"REQCONN_CONNINFO": "host=db password='S3cr3t XX' bogus=1"}, "myapp")
    assert str(info.value).endswith('invalid connection option "bogus"')


@pytest.mark.parametrize("case", CASES)
def test_redact_conninfo_hides_every_piece_of_the_password(case: str) -> None:
    conninfo, _extra, passwords = CASES[case]
    assert leaked(redact_conninfo(conninfo), passwords) == []


def test_scrubbing_hides_pieces_only_of_the_password() -> None:
    message = 'invalid percent-encoded token: "S3cr%ZZ3t" near host "db"'
    scrubbed = scrub_conninfo_error(message, "postgresql://u:S3cr%ZZ3t@db/app")
    assert scrubbed == 'invalid percent-encoded token: "***" near host "db"'


def test_redact_conninfo_leaves_the_rest_of_a_well_read_conninfo_alone() -> None:
    """Pieces are hidden only where libpq misread the password: "ter" of hunter2 stays in
    "internal"."""
    redacted = redact_conninfo("postgresql://app:hunter2@db.internal/app")
    assert redacted == "user=app password=*** dbname=app host=db.internal"
