"""Checks for a user's own test suite: nothing checked out, pools closed at teardown."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

from flask import Flask

from ..extension import ReqConn

__all__ = ["assert_no_checkouts", "checked_out", "close_app", "closing"]


@functools.cache
def _reqconn() -> ReqConn:
    # ``stats(app)`` and ``close(app)`` act on the app they are given, not on the instance.
    return ReqConn()


def checked_out(app: Flask) -> dict[str, list[dict[str, Any]]]:
    """The leases of *app* checked out now in this process, by pool name.

    Covers every pool of the app: the default pool, the read pool and the pools of
    ``REQCONN_POOLS``. Each lease is described as in ``stats()["pools"][name]["holders"]``
    (endpoint, method, path, thread, held_for, and checkout_site with leak detection on).
    Pools with nothing checked out are left out. Abandoned leases waiting for their
    finalizer are handed back first, as ``stats()`` does.
    """
    pools: dict[str, dict[str, Any]] = _reqconn().stats(app)["pools"]
    found: dict[str, list[dict[str, Any]]] = {}
    for name, data in pools.items():
        if data["checked_out"]:
            holders = list(data["holders"])
            # a lease counted but no longer described (collected): still one out
            holders += [{"endpoint": None}] * (data["checked_out"] - len(holders))
            found[name] = holders
    return found


def assert_no_checkouts(app: Flask) -> None:
    """Raise ``AssertionError`` if a connection of *app* is still checked out.

    For a test's teardown: after a request (test client call, streamed response read and
    closed) every connection is back. A response left unread and unclosed still holds its
    connection. Which pools: every pool of the app in this process (see
    :func:`checked_out`); servers running the app in other processes are not seen (use
    their ``/stats``, or the storm tool).
    """
    leaks = checked_out(app)
    if leaks:
        lines = [
            f"pool {name!r}: {len(holders)} checked out: "
            + "; ".join(
                f"{h.get('method') or ''} {h.get('path') or ''} ({h.get('endpoint')})"
                + (f" at {h['checkout_site']}" if h.get("checkout_site") else "")
                for h in holders
            )
            for name, holders in leaks.items()
        ]
        raise AssertionError(
            f"connections of app {app.name!r} still checked out:\n" + "\n".join(lines)
        )


@contextlib.contextmanager
def closing(app: Flask, *, check: bool = True) -> Iterator[Flask]:
    """Yield *app*; on exit close its pools (``reqconn.close(app)``).

    An app built per test otherwise keeps its pool, and the server's backends pile up
    (2, 4, 6 …). With *check* (the default), :func:`assert_no_checkouts` runs first when the
    block ended without an exception; the pools are closed either way.
    """
    ok = False
    try:
        yield app
        ok = True
    finally:
        close_app(app, check=ok and check)


def close_app(app: Flask, *, check: bool = True) -> None:
    """Close *app*'s pools (``reqconn.close(app)``); with *check*, first
    :func:`assert_no_checkouts`.

    :func:`closing` as a call, for ``tearDown`` or ``addCleanup(testing.close_app, app)``.
    The pools are closed even if the check fails; they reopen on next use.

    .. versionadded:: 0.1
    """
    try:
        if check:
            assert_no_checkouts(app)
    finally:
        _reqconn().close(app)
