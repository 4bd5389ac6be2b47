"""Reading and checking the ``REQCONN_*`` configuration.

All keys are read once, in :meth:`ReqConn.init_app`, by :func:`load_config`:
into one frozen :class:`AppSettings` (how requests use the pools) and one
frozen :class:`PoolSettings` per pool (``"default"`` and those of
``REQCONN_POOLS``). Anything wrong fails there, with the key in the message.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing as t
from collections.abc import Iterable, Mapping

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .conninfo import read_conninfo
from .errors import ConfigError
from .names import DEFAULT_POOL
from .netdefaults import TCP_DEFAULTS, conninfo_keys, uses_tcp
from .redact import redact_conninfo, scrub_conninfo_error

CHECKOUT_MODES = ("eager", "lazy")
TRANSACTION_MODES = ("rollback", "autocommit", "atomic")
CANCEL_POLICIES = ("safe", "all", "off")
#: Methods whose queries are cancelled when the client leaves, with the
#: default ``REQCONN_CANCEL_ON_DISCONNECT = "safe"``.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

#: Every key the extension reads, with its default. ``REQCONN_CONNINFO`` has
#: no default: it is required.
DEFAULTS: dict[str, t.Any] = {
    "REQCONN_CONNINFO": None,
    "REQCONN_MIN_SIZE": 1,
    "REQCONN_MAX_SIZE": 10,
    "REQCONN_TIMEOUT": 5.0,
    "REQCONN_MAX_WAITING": 0,
    "REQCONN_MAX_LIFETIME": 3600.0,
    "REQCONN_MAX_IDLE": 600.0,
    "REQCONN_CHECKOUT": "eager",
    "REQCONN_EXEMPT_ENDPOINTS": (),
    "REQCONN_TRANSACTION": "rollback",
    "REQCONN_RESET_SESSION": True,
    "REQCONN_CONNECT_ARGS": {},
    "REQCONN_SESSION_SETTINGS": {},
    "REQCONN_CHECK_CLIENT": True,
    "REQCONN_EOF_MEANS_GONE": True,
    "REQCONN_RETRY_AFTER": 1,
    "REQCONN_LEAK_THRESHOLD": None,
    "REQCONN_CANCEL_ON_DISCONNECT": "safe",
    "REQCONN_MAX_HOLD": 120.0,
    "REQCONN_READ_ONLY": False,
    "REQCONN_PGBOUNCER": False,
    "REQCONN_POOLS": {},
    "REQCONN_READ_POOL": None,
    "REQCONN_READ_FALLBACK": False,
    "REQCONN_TCP_DEFAULTS": True,
    "REQCONN_VALIDATE_IDLE": None,
    "REQCONN_BODY_BUFFER": 1048576,
    "REQCONN_BODY_TIMEOUT": 30.0,
}

#: Keys a named pool in ``REQCONN_POOLS`` may set (without the ``REQCONN_``
#: prefix). Unset ones are inherited from the default pool, except
#: ``CONNINFO``, which each pool must give.
POOL_KEYS = (
    "CONNINFO",
    "MIN_SIZE",
    "MAX_SIZE",
    "TIMEOUT",
    "MAX_WAITING",
    "MAX_LIFETIME",
    "MAX_IDLE",
    "TRANSACTION",
    "RESET_SESSION",
    "CONNECT_ARGS",
    "SESSION_SETTINGS",
    "RETRY_AFTER",
    "READ_ONLY",
    "PGBOUNCER",
    "TCP_DEFAULTS",
    "VALIDATE_IDLE",
)
_POOL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")

#: ``REQCONN_CONNECT_ARGS`` keys that go to ``psycopg.Connection.connect``
#: itself rather than to libpq.
PSYCOPG_CONNECT_ARGS = frozenset({"prepare_threshold", "row_factory", "cursor_factory", "context"})

_GUC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


@dataclasses.dataclass(frozen=True)
class PoolSettings:
    """The validated settings of one pool (the keys of :data:`POOL_KEYS`).

    Built by ``load_pool()``; the default pool's come from the ``REQCONN_*``
    keys, a named pool's from its ``REQCONN_POOLS`` entry over those.
    """

    conninfo: str = dataclasses.field(repr=False)
    min_size: int
    max_size: int
    timeout: float
    max_waiting: int
    max_lifetime: float
    max_idle: float
    transaction: str
    reset_session: bool
    connect_args: Mapping[str, t.Any] = dataclasses.field(repr=False)
    retry_after: int
    read_only: bool
    pgbouncer: bool
    application_name: str
    #: run a validation query on connections idle longer than this (None: never)
    validate_idle: float | None = None
    #: the libpq parameters of :data:`TCP_DEFAULTS` that were added to ``connect_args``
    tcp_defaults: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @property
    def safe_conninfo(self) -> str:
        """The conninfo with any password replaced by ``***``, fit for logs."""
        return redact_conninfo(self.conninfo)

    @property
    def autocommit(self) -> bool:
        return self.transaction == "autocommit"


@dataclasses.dataclass(frozen=True)
class AppSettings:
    """The validated settings of one app: how its requests use the pools.

    Built by ``load_app_settings()``; the same for every pool of the app.
    """

    checkout: str
    exempt_endpoints: frozenset[str]
    check_client: bool
    eof_means_gone: bool
    leak_threshold: float | None
    cancel_on_disconnect: str
    max_hold: float | None
    #: the pool of read-only views (the default pool when unset)
    read_pool: str
    read_fallback: bool
    body_buffer: int = 1048576  # REQCONN_BODY_BUFFER and _TIMEOUT (flask_reqconn.body)
    body_timeout: float | None = 30.0

    @property
    def watcher_tick(self) -> float | None:
        """How often the watcher must run periodic checks (None: never)."""
        ticks = [x / 4 for x in (self.leak_threshold, self.max_hold) if x is not None]
        return min(1.0, *ticks) if ticks else None


def load_pool(config: Mapping[str, t.Any], app_name: str) -> PoolSettings:
    """Validate the pool keys (:data:`POOL_KEYS`) of *config*; return :class:`PoolSettings`.

    :param config: the app's config (read only; defaults are not written back
        here, :meth:`ReqConn.init_app` does that).
    :param app_name: used as the default ``application_name``.
    :raises ConfigError: naming the first key that is missing or invalid.
    """
    get = _Getter(config)

    conninfo = get.conninfo("REQCONN_CONNINFO")
    min_size = get.integer("REQCONN_MIN_SIZE", minimum=0)
    max_size = get.integer("REQCONN_MAX_SIZE", minimum=1)
    if max_size < min_size:
        raise ConfigError(
            "REQCONN_MAX_SIZE",
            f"must be at least REQCONN_MIN_SIZE ({min_size}), got {max_size}",
        )
    connect_args = dict(get.mapping("REQCONN_CONNECT_ARGS"))
    if "autocommit" in connect_args:
        raise ConfigError(
            "REQCONN_CONNECT_ARGS",
            "do not pass 'autocommit' here; set REQCONN_TRANSACTION = 'autocommit' instead",
        )
    session_settings = get.mapping("REQCONN_SESSION_SETTINGS")
    pgbouncer = get.boolean("REQCONN_PGBOUNCER")
    if pgbouncer:
        if session_settings:
            raise ConfigError(
                "REQCONN_SESSION_SETTINGS",
                "cannot be sent through pgbouncer (it rejects the 'options' startup"
                " parameter); set them on the server instead: ALTER ROLE ... SET ...",
            )
        # transaction pooling: a prepared statement may not exist on the next
        # server connection (pgbouncer < 1.21, or max_prepared_statements = 0)
        connect_args.setdefault("prepare_threshold", None)
    options = _session_options(session_settings)
    if options:
        previous = connect_args.get("options") or conninfo_to_dict(conninfo).get("options")
        connect_args["options"] = f"{previous} {options}" if previous else options
    application_name = str(
        connect_args.get("application_name")
        or conninfo_to_dict(conninfo).get("application_name")
        or app_name
    )[:63]
    connect_args["application_name"] = application_name
    tcp_defaults: dict[str, int] = {}
    if get.boolean("REQCONN_TCP_DEFAULTS") and uses_tcp(conninfo, connect_args):
        given = conninfo_keys(conninfo) | set(connect_args)
        tcp_defaults = {k: v for k, v in TCP_DEFAULTS.items() if k not in given}
        connect_args.update(tcp_defaults)
    error = None
    try:
        make_conninfo(
            conninfo,
            **{
                k: v
                for k, v in connect_args.items()
                if k not in PSYCOPG_CONNECT_ARGS and _is_conn_param(v)
            },
        )
    except psycopg.ProgrammingError as exc:
        error = scrub_conninfo_error(str(exc), conninfo, connect_args)
    if error is not None:  # raised out of the except: psycopg's message is no __context__
        raise ConfigError("REQCONN_CONNECT_ARGS", error)

    return PoolSettings(
        conninfo=conninfo,
        min_size=min_size,
        max_size=max_size,
        timeout=get.number("REQCONN_TIMEOUT", positive=True),
        max_waiting=get.integer("REQCONN_MAX_WAITING", minimum=0),
        max_lifetime=get.number("REQCONN_MAX_LIFETIME", positive=True),
        max_idle=get.number("REQCONN_MAX_IDLE", positive=True),
        transaction=get.choice("REQCONN_TRANSACTION", TRANSACTION_MODES),
        reset_session=get.boolean("REQCONN_RESET_SESSION"),
        connect_args=connect_args,
        retry_after=get.integer("REQCONN_RETRY_AFTER", minimum=0),
        read_only=get.boolean("REQCONN_READ_ONLY"),
        pgbouncer=pgbouncer,
        application_name=application_name,
        validate_idle=get.seconds_or_none("REQCONN_VALIDATE_IDLE"),
        tcp_defaults=tcp_defaults,
    )


def load_app_settings(config: Mapping[str, t.Any], pools: Iterable[str]) -> AppSettings:
    """Validate the app keys of *config* (those not in :data:`POOL_KEYS`).

    :param pools: the configured pool names, for ``REQCONN_READ_POOL``.
    :raises ConfigError: naming the first key that is invalid.
    """
    get = _Getter(config)
    names = list(pools)
    read_pool = config.get("REQCONN_READ_POOL")
    if read_pool is not None and not isinstance(read_pool, str):
        raise ConfigError("REQCONN_READ_POOL", f"must be a pool name, got {read_pool!r}")
    if read_pool is not None and read_pool not in names:
        raise ConfigError(
            "REQCONN_READ_POOL",
            f"{read_pool!r} is not a configured pool; configured: {', '.join(sorted(names))}",
        )
    return AppSettings(
        checkout=get.choice("REQCONN_CHECKOUT", CHECKOUT_MODES),
        exempt_endpoints=get.names("REQCONN_EXEMPT_ENDPOINTS"),
        check_client=get.boolean("REQCONN_CHECK_CLIENT"),
        eof_means_gone=get.boolean("REQCONN_EOF_MEANS_GONE"),
        leak_threshold=get.optional_seconds("REQCONN_LEAK_THRESHOLD"),
        cancel_on_disconnect=get.choice("REQCONN_CANCEL_ON_DISCONNECT", CANCEL_POLICIES),
        max_hold=get.optional_seconds("REQCONN_MAX_HOLD"),
        read_pool=read_pool or DEFAULT_POOL,
        read_fallback=get.boolean("REQCONN_READ_FALLBACK"),
        body_buffer=get.integer("REQCONN_BODY_BUFFER", minimum=0),
        body_timeout=get.optional_seconds("REQCONN_BODY_TIMEOUT"),
    )


def load_config(
    config: Mapping[str, t.Any], app_name: str
) -> tuple[AppSettings, dict[str, PoolSettings]]:
    """Validate every ``REQCONN_*`` key of *config*.

    :param config: the app's config (read only; defaults are not written back
        here, :meth:`ReqConn.init_app` does that).
    :param app_name: used as the default ``application_name``.
    :returns: the app's settings, and the settings of each pool by name.
    :raises ConfigError: naming the first key that is missing or invalid.
    """
    pools = load_pool_settings(config, app_name)
    return load_app_settings(config, pools), pools


def load_pool_settings(config: Mapping[str, t.Any], app_name: str) -> dict[str, PoolSettings]:
    """Settings of the default pool and of every pool in ``REQCONN_POOLS``.

    Also rejects unknown ``REQCONN_*`` keys.

    :raises ConfigError: naming the key, e.g. ``REQCONN_POOLS['replica']['MAX_SIZE']``.
    """
    _reject_unknown_keys(config)
    pools = {DEFAULT_POOL: load_pool(config, app_name)}
    named = _Getter(config).mapping("REQCONN_POOLS")
    for name, spec in named.items():
        where = f"REQCONN_POOLS[{name!r}]"
        if not isinstance(name, str) or not _POOL_NAME.match(name) or name == DEFAULT_POOL:
            raise ConfigError(
                "REQCONN_POOLS", f"{name!r} is not a valid pool name (letters, digits, _ and -;"
                " 'default' is the main pool)"
            )
        if not isinstance(spec, Mapping):
            raise ConfigError(where, f"must be a dict of pool settings, got {type(spec).__name__}")
        for key in spec:
            if key not in POOL_KEYS:
                close = difflib.get_close_matches(str(key), POOL_KEYS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                allowed = ", ".join(POOL_KEYS)
                raise ConfigError(
                    where, f"unknown pool setting {key!r}{hint} (allowed: {allowed})"
                )
        if "CONNINFO" not in spec:
            raise ConfigError(where, "needs its own 'CONNINFO'")
        merged = {k: v for k, v in config.items() if k != "REQCONN_POOLS"}
        merged.update({f"REQCONN_{key}": value for key, value in spec.items()})
        try:
            pools[name] = load_pool(merged, app_name)
        except ConfigError as exc:
            key = exc.key.removeprefix("REQCONN_")
            message = str(exc).split(": ", 1)[1]
            if key == "MAX_SIZE" and "MIN_SIZE" not in spec:
                message += " (the pool inherits REQCONN_MIN_SIZE; give it its own 'MIN_SIZE')"
            raise ConfigError(f"{where}[{key!r}]", message) from None
    return pools


def _reject_unknown_keys(config: Mapping[str, t.Any]) -> None:
    for key in config:
        if isinstance(key, str) and key.startswith("REQCONN_") and key not in DEFAULTS:
            close = difflib.get_close_matches(key, DEFAULTS, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(key, f"unknown flask-reqconn setting{hint}")


def _session_options(settings: Mapping[str, t.Any]) -> str:
    parts = []
    for name, value in settings.items():
        if not isinstance(name, str) or not _GUC_NAME.match(name):
            raise ConfigError(
                "REQCONN_SESSION_SETTINGS", f"{name!r} is not a PostgreSQL setting name"
            )
        if isinstance(value, bool):
            text = "on" if value else "off"
        elif isinstance(value, (str, int, float)):
            text = str(value)
        else:
            raise ConfigError(
                "REQCONN_SESSION_SETTINGS",
                f"value of {name!r} must be a string, number or bool, got {type(value).__name__}",
            )
        escaped = text.replace("\\", "\\\\").replace(" ", "\\ ")
        parts.append(f"-c {name}={escaped}")
    return " ".join(parts)


def _is_conn_param(value: t.Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


class _Getter:
    """Typed access to config keys with defaults, raising :class:`ConfigError`."""

    def __init__(self, config: Mapping[str, t.Any]) -> None:
        self._config = config

    def _get(self, key: str) -> t.Any:
        return self._config.get(key, DEFAULTS[key])

    def conninfo(self, key: str) -> str:
        return read_conninfo(key, self._get(key))

    def integer(self, key: str, *, minimum: int) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        if value < minimum:
            raise ConfigError(key, f"must be at least {minimum}, got {value}")
        return value

    def number(self, key: str, *, positive: bool) -> float:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number of seconds, got {value!r}")
        if positive and not value > 0:
            raise ConfigError(key, f"must be greater than 0, got {value}")
        return float(value)

    def optional_seconds(self, key: str) -> float | None:
        value = self._get(key)
        if value is None or value == 0:
            return None
        return self.number(key, positive=True)

    def seconds_or_none(self, key: str) -> float | None:
        """None, or a number of seconds >= 0 (0 is a valid threshold here)."""
        value = self._get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(key, f"must be None or a number of seconds >= 0, got {value!r}")
        return float(value)

    def boolean(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be True or False, got {value!r}")
        return value

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self._get(key)
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise ConfigError(key, f"must be one of {allowed}, got {value!r}")
        return t.cast(str, value)

    def names(self, key: str) -> frozenset[str]:
        value = self._get(key)
        if isinstance(value, str) or not isinstance(value, Iterable):
            raise ConfigError(key, f"must be a list of endpoint names, got {value!r}")
        items = list(value)
        for item in items:
            if not isinstance(item, str):
                raise ConfigError(key, f"must contain endpoint names (strings), got {item!r}")
        return frozenset(items)

    def mapping(self, key: str) -> Mapping[str, t.Any]:
        value = self._get(key)
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"must be a dict, got {type(value).__name__}")
        return value
