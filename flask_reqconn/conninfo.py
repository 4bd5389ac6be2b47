"""The forms a connection string (``REQCONN_CONNINFO``, a named pool's ``CONNINFO``) may take.

A libpq conninfo, in the keyword form or as a ``postgresql://`` (``postgres://``)
URL, is taken as it is. An SQLAlchemy URL of PostgreSQL (``postgresql+psycopg://...``,
what many apps keep in ``DATABASE_URL``) is read without its ``+driver`` part, which
only chooses SQLAlchemy's DBAPI module. A URL of another database, or a string libpq
cannot parse, is a :class:`~flask_reqconn.ConfigError` naming the key, with no piece of
a password in it (:mod:`flask_reqconn.redact`).
"""

from __future__ import annotations

import re

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .errors import ConfigError
from .redact import scrub_conninfo_error, url_misread

#: an SQLAlchemy URL of PostgreSQL: ``postgresql+psycopg://``, ``postgres+psycopg2://``...
_SQLALCHEMY_SCHEME = re.compile(r"^\s*(postgresql|postgres)\+([A-Za-z0-9_]+)://")
#: a URL's scheme
_URL_SCHEME = re.compile(r"^\s*([A-Za-z][A-Za-z0-9+.-]*)://")


def read_conninfo(key: str, value: object) -> str:
    """The conninfo *value* of the config key *key*, as libpq will get it.

    :raises ConfigError: *value* is missing, not a string, a URL of another
        database, or not parsable by libpq.
    """
    if value is None or value == "":
        raise ConfigError(
            key,
            "is required: set it to a libpq connection string or URL, "
            "e.g. 'postgresql://user@host/dbname'",
        )
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, got {type(value).__name__}")
    conninfo, driver = drop_sqlalchemy_driver(value)
    scheme = _URL_SCHEME.match(conninfo)
    if scheme and scheme[1] not in ("postgresql", "postgres"):
        raise ConfigError(
            key,
            f"is a {scheme[1]!r} URL, not PostgreSQL's: write"
            " 'postgresql://user@host/dbname' or a libpq keyword string",
        )
    reason = None
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        reason = scrub_conninfo_error(str(exc), conninfo)
    else:
        if scheme and url_misread(params):  # the values are not echoed: pieces of a password
            reason = (
                "libpq misreads the URL (a port that is not a number, or an '@' in the"
                " host): percent-encode '/' and '@' in the user name and password"
                " (%2F, %40)"
            )
    if reason is not None:  # raised out of the except: psycopg's message is no __context__
        if driver:
            reason += (
                f" (read as an SQLAlchemy URL without its '+{driver}':"
                " its query parameters must be libpq's)"
            )
        raise ConfigError(key, f"is not a valid connection string: {reason}")
    return conninfo


def drop_sqlalchemy_driver(conninfo: str) -> tuple[str, str]:
    """*conninfo* without the ``+driver`` of an SQLAlchemy URL, and that driver ("" if none).

    ``postgresql+psycopg://u@h/db`` is ``postgresql://u@h/db`` to libpq.
    """
    match = _SQLALCHEMY_SCHEME.match(conninfo)
    if match is None:
        return conninfo, ""
    return f"{match[1]}://{conninfo[match.end() :]}", match[2]
