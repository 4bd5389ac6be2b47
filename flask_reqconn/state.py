"""What flask-reqconn keeps for one app: ``app.extensions["reqconn"]``.

Reach it with :func:`flask_reqconn.state_of`. Integrations use
:attr:`AppState.pools` (one :class:`~flask_reqconn.pool.PoolHolder` per pool
name), :attr:`AppState.settings` and :meth:`AppState.add_listener`.
"""

from __future__ import annotations

import collections
import typing as t
from collections.abc import Callable

from flask import Flask, current_app

from .config import AppSettings, PoolSettings
from .errors import ReqConnError
from .middleware import run_deferred
from .names import DEFAULT_POOL, EXTENSION_KEY
from .policy import Marks, Policy
from .pool import PoolHolder
from .stats import Listener, sum_pools

if t.TYPE_CHECKING:
    from .extension import ReqConn


class Pools(dict[str, PoolHolder]):
    """The app's pools by name; a name not configured raises :class:`ReqConnError`
    naming the configured ones."""

    def __missing__(self, name: str) -> PoolHolder:
        raise ReqConnError(
            f"no pool named {name!r}; configured pools: {', '.join(sorted(self))}"
        )


class AppState:
    """Everything flask-reqconn keeps for one app, in the process that serves it.

    :param ext: the extension instance the app was set up with.
    :param app_name: the Flask app's name (pool labels, logs).
    :param settings: the app's settings.
    :param pools: the settings of each pool, by name (``"default"`` first).
    :param marks: the decorators' marks of *ext*.
    """

    def __init__(
        self,
        ext: ReqConn,
        app_name: str,
        settings: AppSettings,
        pools: dict[str, PoolSettings],
        marks: Marks,
    ) -> None:
        #: the :class:`~flask_reqconn.ReqConn` the app was set up with
        self.ext = ext
        self.app_name = app_name
        #: the app's settings (checkout mode, client check, cancel policy, read pool...)
        self.settings = settings
        #: per-endpoint decisions (eager checkout, read-only, cancel on disconnect)
        self.policy = Policy(marks, settings)
        #: finalizer work waiting for a safe point (:func:`~flask_reqconn.middleware.run_deferred`)
        self.deferred: collections.deque[Callable[[], None]] = collections.deque()
        #: where the WSGI wrapper finds the request's leases in the environ
        self.environ_key = f"flask_reqconn.request.{id(self):x}"
        #: the pools of the app by name: ``"default"`` and those of ``REQCONN_POOLS``
        self.pools = Pools(
            (
                name,
                PoolHolder(
                    name,
                    pool_settings,
                    settings,
                    label=f"reqconn:{app_name}" + ("" if name == DEFAULT_POOL else f":{name}"),
                ),
            )
            for name, pool_settings in pools.items()
        )
        #: some pool commits after the view (REQCONN_TRANSACTION = "atomic")
        self.any_atomic = any(p.transaction == "atomic" for p in pools.values())

    def __repr__(self) -> str:
        return f"<AppState {self.app_name!r} {self.settings.checkout}>"

    def pool(self, name: str) -> PoolHolder:
        """The pool named *name*: ``pools[name]``.

        :raises ReqConnError: no such pool is configured.
        """
        return self.pools[name]

    def add_listener(self, listener: Listener, pool: str | None = None) -> None:
        """Send every later event of *pool* (default: every pool) to *listener*.

        :raises ReqConnError: no such pool is configured.
        """
        for holder in self.pools.values() if pool is None else (self.pools[pool],):
            holder.add_listener(listener)

    def stats(self) -> dict[str, t.Any]:
        """The counters of this process: see :meth:`~flask_reqconn.ReqConn.stats`."""
        if self.deferred:  # a safe point
            run_deferred(self.deferred)
        return sum_pools({name: holder.stats() for name, holder in self.pools.items()})

    def close(self) -> None:
        """Close this process's pools; they reopen on next use."""
        for holder in self.pools.values():
            holder.close()


def state_of(app: Flask | None = None) -> AppState:
    """The state flask-reqconn keeps for *app* (default: the current app).

    The way in for integrations and tests: its ``pools`` (each pool's
    :class:`~flask_reqconn.pool.PoolHolder` by name), ``settings`` and
    ``add_listener()``.

    :raises ReqConnError: no app given and no app context, or no ``init_app`` on it.

    .. versionadded:: 0.1
    """
    if app is None:
        try:
            app = current_app._get_current_object()  # type: ignore[attr-defined]
        except RuntimeError:
            raise ReqConnError(
                "no app given and no application context is active: pass the app,"
                " or use 'with app.app_context():'"
            ) from None
    state = t.cast(Flask, app).extensions.get(EXTENSION_KEY)
    if state is None:
        raise ReqConnError(
            f"flask-reqconn is not set up on app {t.cast(Flask, app).name!r}."
            " Did you forget to call ReqConn(app) or reqconn.init_app(app)?"
        )
    return t.cast(AppState, state)
