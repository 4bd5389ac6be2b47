"""flask-reqconn: one PostgreSQL connection per Flask request, always given back."""

from __future__ import annotations

from .checkout import get_conn
from .errors import (
    ClientGone,
    ConfigError,
    ConnectionReleased,
    DatabaseRefused,
    DatabaseUnavailable,
    PoolExhausted,
    ReqConnError,
)
from .extension import ReqConn
from .lease import Lease
from .names import ReleaseReason
from .state import state_of

__version__ = "0.1.0.dev0"

__all__ = [
    "ClientGone",
    "ConfigError",
    "ConnectionReleased",
    "DatabaseRefused",
    "DatabaseUnavailable",
    "Lease",
    "PoolExhausted",
    "ReleaseReason",
    "ReqConn",
    "ReqConnError",
    "get_conn",
    "state_of",
]
