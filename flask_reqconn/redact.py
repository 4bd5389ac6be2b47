"""Keeping passwords out of logs and error messages.

libpq echoes part of a conninfo it cannot parse (``unexpected spaces found in
"S3cr3t XX"``), and what it echoes may be a password, or a piece of one. So
messages about a conninfo go through :func:`scrub_conninfo_error`, which hides
everything in them that shares three characters with anything in the conninfo
that may be a password, found even when the conninfo does not parse.
"""

from __future__ import annotations

import re
import typing as t
from collections.abc import Iterable, Mapping
from urllib.parse import unquote

from psycopg.conninfo import conninfo_to_dict, make_conninfo

_URL_USERINFO = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
_PASSWORD_KV = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)

#: the scheme of a URL conninfo (``postgresql://``, ``postgres+psycopg://``...)
_URL_SCHEME = re.compile(r"^\s*[A-Za-z][A-Za-z0-9+.-]*://")
#: ``password=`` in a URL's query string, up to the next parameter
_QUERY_PASSWORD = re.compile(r"[?&]password=([^&#]*)", re.IGNORECASE)
#: ``password =`` in the keyword form; its value is read by :func:`_keyword_value`
_KEYWORD_PASSWORD = re.compile(r"(?:^|\s)password\s*=\s*", re.IGNORECASE)
#: the next ``keyword =`` of the keyword form
_NEXT_KEYWORD = re.compile(r"\s+[A-Za-z_][A-Za-z0-9_]*\s*=")
#: pieces shorter than this are not hidden (every message has two-letter words)
FRAGMENT = 3
_MASK = "***"


def redact_conninfo(conninfo: str) -> str:
    """Return *conninfo* with its password hidden, and every piece of it that libpq read
    as another parameter (:func:`url_misread`). Never raises."""
    try:
        params = conninfo_to_dict(conninfo)
    except Exception:
        return scrub_conninfo_error(conninfo, conninfo)
    misread = url_misread(params)
    if "password" in params:
        params["password"] = _MASK
    try:
        redacted = make_conninfo("", **params)
        return scrub_conninfo_error(redacted, conninfo) if misread else redacted
    except Exception:
        return "<conninfo>"


def url_misread(params: Mapping[str, t.Any]) -> bool:
    """Did libpq read part of a URL's password as another parameter?

    A ``/`` left unencoded in the password ends the host part early (the rest of
    the password is read as a port, that is not a number, and a database name),
    an ``@`` ends the user info early (the rest is read into the host). *params* are
    the conninfo's as libpq parsed them.
    """
    ports = str(params.get("port") or "").split(",")
    hosts = str(params.get("host") or "").split(",")
    return any(p.strip() and not p.strip().isdigit() for p in ports) or any(
        "@" in h and not h.startswith(("/", "@")) for h in hosts
    )


def scrub_secrets(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove passwords from free text (error messages, conninfo strings)."""
    text = text.strip()
    for secret in secrets:
        if secret:
            text = text.replace(secret, _MASK)
    text = _URL_USERINFO.sub(r"\1***@", text)
    return _PASSWORD_KV.sub(r"\1***", text)


def conninfo_passwords(conninfo: str, connect_args: Mapping[str, t.Any]) -> list[str]:
    """The passwords in *conninfo* and *connect_args*, to scrub from messages.

    For a conninfo that libpq cannot parse, the guesses are generous: the whole
    password part of a URL's user info (up to its last ``@``), a query string's
    ``password=`` value, and a keyword form's ``password=`` value up to the next
    keyword, each as written and percent-decoded.
    """
    found = [str(connect_args.get("password") or "")]
    try:
        found.append(str(conninfo_to_dict(conninfo).get("password") or ""))
    except Exception:
        pass
    found += _password_guesses(conninfo)
    return [s for s in dict.fromkeys(found) if s]


def scrub_conninfo_error(
    message: str, conninfo: str, connect_args: Mapping[str, t.Any] | None = None
) -> str:
    """*message*, about *conninfo*, with no password in it, nor any piece of one.

    Every run of text sharing :data:`FRAGMENT` or more characters with a password
    of :func:`conninfo_passwords` is replaced by ``***``, and a quoted part of the
    message that held one becomes ``"***"`` as a whole. Never raises.
    """
    try:
        secrets = conninfo_passwords(conninfo, connect_args or {})
        text = scrub_secrets(message, secrets)
        for secret in secrets:
            text = _mask_fragments(text, secret)
        return re.sub(r'"[^"\n]*\*\*\*[^"\n]*"', '"***"', text)
    except Exception:
        return "<message hidden: it may contain a password>"


def _password_guesses(conninfo: str) -> list[str]:
    """What may be a password in *conninfo*, read without libpq (which may refuse it)."""
    guesses: list[str] = []
    scheme = _URL_SCHEME.match(conninfo)
    if scheme:
        rest = conninfo[scheme.end() :]
        userinfo = rest[: rest.rfind("@")] if "@" in rest else ""
        if ":" in userinfo:
            guesses.append(userinfo.split(":", 1)[1])
        guesses += _QUERY_PASSWORD.findall(rest)
    else:
        for match in _KEYWORD_PASSWORD.finditer(conninfo):
            guesses.append(_keyword_value(conninfo[match.end() :]))
    decoded = []
    for guess in guesses:
        try:
            decoded.append(unquote(guess, errors="strict"))
        except UnicodeDecodeError:
            pass
    return guesses + decoded


def _keyword_value(text: str) -> str:
    """The value at the start of *text*: quoted (maybe unterminated), or up to the next
    keyword (an unquoted password with a space in it counts whole)."""
    if text.startswith("'"):
        value, i = [], 1
        while i < len(text) and text[i] != "'":
            if text[i] == "\\" and i + 1 < len(text):
                i += 1
            value.append(text[i])
            i += 1
        return "".join(value)
    end = _NEXT_KEYWORD.search(text)
    return (text[: end.start()] if end else text).strip()


def _mask_fragments(text: str, secret: str) -> str:
    """Replace each run of *text* covered by pieces of *secret* of FRAGMENT characters."""
    if len(secret) < FRAGMENT:
        return text
    pieces = {secret[i : i + FRAGMENT] for i in range(len(secret) - FRAGMENT + 1)}
    hidden = [False] * len(text)
    for i in range(len(text) - FRAGMENT + 1):
        if text[i : i + FRAGMENT] in pieces:
            hidden[i : i + FRAGMENT] = [True] * FRAGMENT
    if not any(hidden):
        return text
    out: list[str] = []
    for i, char in enumerate(text):
        if not hidden[i]:
            out.append(char)
        elif i == 0 or not hidden[i - 1]:
            out.append(_MASK)
    return "".join(out)
