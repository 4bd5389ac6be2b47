"""Strict mode: a connection used after its request handed it back raises.

Without it, a connection kept past its request (``conn = get_conn()`` stored in a global, a
closure, a test variable used after the test client returned) still works: it runs queries
on a connection that is back in the pool, which another request may be using. In strict
mode ``get_conn()`` returns a thin proxy that checks, on every attribute access, that the
request's lease is still active, and raises :class:`~flask_reqconn.ConnectionReleased`
otherwise. Cursors made through the proxy are checked the same way.

Strict mode is for tests: it is per process (and not passed on to server subprocesses), and
the proxy is not an instance of ``psycopg.Connection``. Off (the default), nothing changes on
the request path.
"""

from __future__ import annotations

import contextlib
import typing as t
from collections.abc import Iterator

import psycopg

from .. import lease as _lease
from ..errors import ConnectionReleased
from ..lease import Lease

__all__ = ["StrictProxy", "disable_strict", "enable_strict", "strict", "strict_enabled"]


def _released(lease: Lease, what: str) -> ConnectionReleased:
    by = lease.released_by.value if lease.released_by is not None else "unknown"
    where = f" of {lease.method} {lease.path}".rstrip() if lease.method else ""
    return ConnectionReleased(
        f"this {what} belongs to a request{where} whose connection (pool"
        f" {lease.pool_name!r}) was already handed back (released by {by}); it may be"
        " serving another request now. Call get_conn() inside each request instead of"
        " keeping the connection; outside requests use 'with reqconn.connection() as conn:'"
    )


class StrictProxy:
    """Stands for a connection (or a cursor) of one lease; refuses use once it ended."""

    __slots__ = ("_target", "_lease", "_what")

    def __init__(self, target: object, lease: Lease, what: str = "connection") -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_lease", lease)
        object.__setattr__(self, "_what", what)

    def _checked(self) -> t.Any:
        lease: Lease = object.__getattribute__(self, "_lease")
        if not lease.active:
            raise _released(lease, object.__getattribute__(self, "_what"))
        return object.__getattribute__(self, "_target")

    def __getattr__(self, name: str) -> t.Any:
        value = getattr(self._checked(), name)
        if name in ("cursor", "execute") and callable(value):
            return self._wrapping(value)
        return value

    def _wrapping(self, method: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
        lease: Lease = object.__getattribute__(self, "_lease")

        def call(*args: t.Any, **kwargs: t.Any) -> t.Any:
            return StrictProxy(method(*args, **kwargs), lease, "cursor")

        return call

    def __setattr__(self, name: str, value: t.Any) -> None:
        setattr(self._checked(), name, value)

    def __enter__(self) -> t.Any:
        target = self._checked()
        entered = target.__enter__()
        return self if entered is target else entered

    def __exit__(self, *exc_info: t.Any) -> t.Any:
        return object.__getattribute__(self, "_target").__exit__(*exc_info)

    def __iter__(self) -> Iterator[t.Any]:
        return iter(self._checked())

    def __repr__(self) -> str:
        lease: Lease = object.__getattribute__(self, "_lease")
        target = object.__getattribute__(self, "_target")
        state = "active" if lease.active else "released"
        return f"<StrictProxy {state} {target!r}>"


def _wrap(lease: Lease, conn: psycopg.Connection[t.Any]) -> psycopg.Connection[t.Any]:
    return t.cast("psycopg.Connection[t.Any]", StrictProxy(conn, lease))


def enable_strict() -> None:
    """Turn strict mode on for this process (for checkouts from now on)."""
    _lease.handout_wrapper = _wrap


def disable_strict() -> None:
    """Turn strict mode off (connections already handed out keep their proxy)."""
    _lease.handout_wrapper = None


def strict_enabled() -> bool:
    return _lease.handout_wrapper is _wrap


@contextlib.contextmanager
def strict(enabled: bool = True) -> Iterator[None]:
    """Strict mode on (or off) inside the block, as it was afterwards."""
    before = _lease.handout_wrapper
    _lease.handout_wrapper = _wrap if enabled else None
    try:
        yield
    finally:
        _lease.handout_wrapper = before
