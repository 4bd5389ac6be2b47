"""Leak oracles: how many connections the app still has checked out.

Two sources: the app's own JSON stats endpoint (:class:`StatsOracle`), and the sessions of
an ``application_name`` in ``pg_stat_activity`` that are not idle (:class:`PgOracle`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .client import USER_AGENT, Target, http_get, request_bytes
from .results import LeakReading

if TYPE_CHECKING:
    import psycopg

logger = logging.getLogger(__name__)

_POLL_INTERVAL = 0.1


class Oracle(Protocol):
    """One source of the checked-out count; ``read`` raises when it cannot tell."""

    source: str
    name: str
    label: str

    def read(self) -> int: ...

    def close(self) -> None: ...


_MISSING = object()


def _lookup(data: object, path: Sequence[str]) -> object:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return _MISSING
        data = data[key]
    return data


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def int_in_json(data: object, key: str) -> int | None:
    """The integer at dotted ``key``; for a key missing at the top level, the sum over
    ``data["pools"][*][key]`` (the dotted path inside each pool); ``None`` if neither."""
    path = key.split(".")
    value = _lookup(data, path)
    if value is _MISSING and isinstance(data, dict):
        pools = data.get("pools")
        if isinstance(pools, dict) and pools:
            values = [_lookup(pool, path) for pool in pools.values()]
            if all(_is_int(v) for v in values):
                return sum(v for v in values if isinstance(v, int))
    return value if isinstance(value, int) and _is_int(value) else None


def _checked_out_from_json(data: object, key: str) -> int:
    """The integer at dotted ``key``; for a plain key, fall back to the sum over
    ``data["pools"][*][key]``."""
    path = key.split(".")
    value = _lookup(data, path)
    if value is _MISSING and len(path) == 1:
        summed = int_in_json(data, key)
        if summed is not None:
            return summed
    if isinstance(value, int) and _is_int(value):
        return value
    raise ValueError(f"no integer at key {key!r} in the stats JSON (set --stats-key)")


def pool_max_in_json(data: object) -> int | None:
    """The pool size a stats JSON states: ``pool_max`` at the top, in ``pool`` (psycopg_pool's
    ``get_stats()``), or summed over ``pools.<name>.pool`` (flask-reqconn's stats)."""
    for key in ("pool_max", "pool.pool_max"):
        value = int_in_json(data, key)
        if value:
            return value
    return None


#: Counters of requests the app answered because their client stalled or left mid-body
#: (flask-reqconn's stats: 408 and 499).
GONE_KEYS = ("client_gone", "stalled")


def gone_in_json(data: object) -> int | None:
    """The sum of :data:`GONE_KEYS` in a stats JSON, ``None`` if it has none of them."""
    values = [int_in_json(data, key) for key in GONE_KEYS]
    if all(v is None for v in values):
        return None
    return sum(v for v in values if v is not None)


class StatsOracle:
    """The integer at a dotted key of the app's JSON stats endpoint."""

    source = "stats"

    def __init__(self, target: Target, key: str, headers: Sequence[tuple[str, str]],
                 timeout: float) -> None:
        self.target = target
        self.key = key
        self.request = request_bytes(target, headers)
        self.timeout = timeout
        self.name = key
        self.label = f"{key} at {target.url}"

    def read_json(self) -> object:
        """The whole JSON document."""
        body = bytearray()
        status = http_get(self.target, self.request, time.monotonic() + self.timeout, body)
        if not 200 <= status < 300:
            raise ValueError(f"stats URL answered {status}")
        return json.loads(bytes(body))

    def count(self, data: object) -> int:
        """The checked-out count in *data*, a document :meth:`read_json` returned."""
        return _checked_out_from_json(data, self.key)

    def read(self) -> int:
        return self.count(self.read_json())

    def close(self) -> None:
        pass


_PG_QUERY = """
SELECT count(*) FILTER (WHERE state <> 'idle'),
       count(*) FILTER (WHERE query = '<insufficient privilege>')
FROM pg_stat_activity
WHERE application_name = %s AND pid <> pg_backend_pid()
"""


class PgOracle:
    """Sessions of an ``application_name`` whose ``state`` is not ``'idle'``."""

    source = "pg"

    def __init__(self, dsn: str, application_name: str, timeout: float) -> None:
        self.dsn = dsn
        self.application_name = application_name
        self.timeout = timeout
        self.name = "non-idle sessions"
        self.label = f"non-idle sessions of application_name {application_name!r}"
        self.conn: psycopg.Connection[Any] | None = None

    def read(self) -> int:
        import psycopg

        if self.conn is None or self.conn.closed:
            from psycopg.conninfo import conninfo_to_dict

            # the dsn's own connect_timeout wins; else the oracle's timeout bounds the wait
            params: dict[str, Any] = {"application_name": USER_AGENT}
            if "connect_timeout" not in conninfo_to_dict(self.dsn):
                params["connect_timeout"] = max(1, math.ceil(self.timeout))
            self.conn = psycopg.connect(self.dsn, autocommit=True, **params)
        row = self.conn.execute(_PG_QUERY, (self.application_name,)).fetchone()
        busy, hidden = (int(row[0]), int(row[1])) if row else (0, 0)
        if hidden:
            raise PermissionError(
                f"{hidden} session(s) of {self.application_name!r} hide their state from this "
                "role: connect as the app's role or a member of pg_read_all_stats"
            )
        return busy

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def read_oracles(
    oracles: Sequence[Oracle], readings: Sequence[LeakReading]
) -> list[int | None]:
    """Read each oracle once; a failure is recorded in its reading and gives ``None``."""
    values: list[int | None] = []
    for oracle, reading in zip(oracles, readings, strict=True):
        try:
            values.append(oracle.read())
        except Exception as exc:  # an oracle failure is a finding, not a crash
            logger.debug("leak oracle %s failed: %r", oracle.label, exc)
            reading.error = f"{type(exc).__name__}: {exc}"
            values.append(None)
    return values


def settle(
    oracles: Sequence[Oracle],
    readings: Sequence[LeakReading],
    timeout: float,
    deadline: float,
) -> list[int | None]:
    """Poll until every oracle reads 0 twice in a row, or the time is up."""
    end = min(time.monotonic() + timeout, deadline)
    zeros = 0
    while True:
        values = read_oracles(oracles, readings)
        zeros = zeros + 1 if all(v == 0 for v in values) else 0
        now = time.monotonic()
        if zeros >= 2 or now >= end:
            return values
        time.sleep(min(_POLL_INTERVAL, end - now))
