"""Bounded network waits: the libpq TCP parameters flask-reqconn adds by default.

A path that drops packets silently (a NAT gateway or load balancer that forgot
the connection) otherwise leaves a request waiting until the kernel gives up
(``tcp_retries2``, about 15 minutes). Unix sockets get none of this.
"""

from __future__ import annotations

import typing as t
from collections.abc import Mapping

from psycopg.conninfo import conninfo_to_dict

#: libpq parameters added to the connection of a TCP host with
#: ``REQCONN_TCP_DEFAULTS = True``, unless the conninfo or ``REQCONN_CONNECT_ARGS``
#: sets them. A path that drops packets silently then surfaces within seconds:
#: an idle connection after about ``keepalives_idle`` + ``tcp_user_timeout``
#: (the kernel's user timeout overrides ``keepalives_count``), a busy one whose
#: data is not acknowledged after ``tcp_user_timeout`` (ms), a new one after
#: ``connect_timeout``. They cannot see a frozen server, whose kernel still
#: acknowledges: ``REQCONN_MAX_HOLD`` is for that.
TCP_DEFAULTS: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 8000,
    "connect_timeout": 5,
}


def uses_tcp(conninfo: str, connect_args: Mapping[str, t.Any] | None = None) -> bool:
    """True if any host of *conninfo* (or of ``connect_args``) is reached over TCP.

    A host that is empty or starts with ``/`` or ``@`` is a unix socket (libpq's
    rule); no host at all means libpq's default socket. A ``hostaddr`` is TCP.
    """
    params = dict(conninfo_to_dict(conninfo))
    for key in ("host", "hostaddr"):
        if connect_args and connect_args.get(key) is not None:
            params[key] = connect_args[key]
    if str(params.get("hostaddr") or "").strip(","):
        return True
    hosts = str(params.get("host") or "").split(",")
    return any(h.strip() and not h.strip().startswith(("/", "@")) for h in hosts)


def conninfo_keys(conninfo: str) -> set[str]:
    """The parameter names *conninfo* sets."""
    return set(conninfo_to_dict(conninfo))
