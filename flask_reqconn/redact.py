"""Keeping passwords out of logs and error messages."""

from __future__ import annotations

import re
import typing as t
from collections.abc import Iterable, Mapping

from psycopg.conninfo import conninfo_to_dict, make_conninfo

_URL_USERINFO = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
_PASSWORD_KV = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact_conninfo(conninfo: str) -> str:
    """Return *conninfo* with its password hidden. Never raises."""
    try:
        params = conninfo_to_dict(conninfo)
    except Exception:
        return scrub_secrets(conninfo)
    if "password" in params:
        params["password"] = "***"
    try:
        return make_conninfo("", **params)
    except Exception:
        return "<conninfo>"


def scrub_secrets(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove passwords from free text (error messages, conninfo strings)."""
    text = text.strip()
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _URL_USERINFO.sub(r"\1***@", text)
    return _PASSWORD_KV.sub(r"\1***", text)


def conninfo_passwords(conninfo: str, connect_args: Mapping[str, t.Any]) -> list[str]:
    """The passwords in *conninfo* and *connect_args*, to scrub from messages."""
    found = [str(connect_args.get("password") or "")]
    try:
        found.append(str(conninfo_to_dict(conninfo).get("password") or ""))
    except Exception:
        pass
    return found
