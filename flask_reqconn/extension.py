"""The Flask extension: :class:`ReqConn` (:func:`get_conn` is in :mod:`flask_reqconn.checkout`)."""

from __future__ import annotations

import contextlib
import functools
import typing as t
from collections.abc import Callable, Iterator

import psycopg
from flask import Blueprint, Flask

from . import checkout as _checkout
from .cli import make_cli
from .config import DEFAULTS, load_config
from .middleware import LeaseGuard
from .names import DEFAULT_POOL, EXTENSION_KEY
from .policy import Mark, Marks
from .state import AppState, state_of

F = t.TypeVar("F", bound=Callable[..., t.Any] | Blueprint)


class ReqConn:
    """Give every request one PostgreSQL connection from a psycopg pool.

    ``ReqConn(app)`` or ``ReqConn()`` and later :meth:`init_app` (app
    factories). One instance may serve several apps; each app has its own
    pool, opened lazily in the process that serves requests.

    :param app: the Flask app to set up now, if any.
    """

    def __init__(self, app: Flask | None = None) -> None:
        self._marks = Marks()
        if app is not None:
            self.init_app(app)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"

    def init_app(self, app: Flask) -> None:
        """Read the ``REQCONN_*`` config, register the hooks, wrap ``app.wsgi_app``.

        Nothing is connected here: the pool opens on the first request in
        the serving process.

        :raises ConfigError: a key is missing or invalid; the message names it.
        :raises RuntimeError: the app already has a ``ReqConn``.
        """
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                "A 'ReqConn' instance has already been registered on this Flask app."
                " Import and use that instance instead."
            )
        settings, pools = load_config(app.config, app.name)
        for key, value in DEFAULTS.items():
            if value is not None:
                app.config.setdefault(key, value)
        state = AppState(self, app.name, settings, pools, self._marks)
        app.extensions[EXTENSION_KEY] = state
        if settings.checkout == "eager":
            app.before_request(functools.partial(_checkout.before_request, state))
        app.after_request(functools.partial(_checkout.after_request, state))
        app.teardown_request(functools.partial(_checkout.teardown_request, state))
        app.wsgi_app = LeaseGuard(app.wsgi_app, state, app)  # type: ignore[method-assign]
        app.cli.add_command(make_cli())
        app.register_error_handler(
            psycopg.OperationalError, functools.partial(_checkout.on_operational_error, state)
        )
        if settings.cancel_on_disconnect != "off" or settings.max_hold is not None:
            app.register_error_handler(
                psycopg.errors.QueryCanceled,
                functools.partial(_checkout.on_query_canceled, state),
            )

    def exempt(self, view: F) -> F:
        """Exempt a view function or a blueprint from the eager checkout.

        Usable as a decorator. Static files (endpoints ``static`` and
        ``<blueprint>.static``) are always exempt. An exempt view still gets a connection if it
        calls :func:`get_conn` (lazily, on that call). Exempting a blueprint
        exempts the blueprints nested in it.
        """
        self._marks.set(view, Mark.EXEMPT)
        return view

    def read_only(self, view: F) -> F:
        """Mark a view or a blueprint as read-only (usable as a decorator).

        Its ``get_conn()`` checks out from ``REQCONN_READ_POOL`` (a replica;
        the default pool when unset), falling back to the default pool when
        that pool is exhausted and ``REQCONN_READ_FALLBACK`` is True, and the
        connection is made read-only, so an accidental write fails loudly
        (``psycopg.errors.ReadOnlySqlTransaction``).
        """
        self._marks.set(view, Mark.READ_ONLY)
        return view

    def cancel_on_disconnect(self, enabled: bool = True) -> Callable[[F], F]:
        """Decorator: override ``REQCONN_CANCEL_ON_DISCONNECT`` for a view or a blueprint.

        ``@reqconn.cancel_on_disconnect()`` arms cancellation for a view whose
        method the policy leaves alone (a POST whose work is all in the
        database, rolled back when cancelled); ``@reqconn.cancel_on_disconnect(False)``
        keeps a view's queries running when its client leaves. For a
        blueprint, call it on the blueprint:
        ``reqconn.cancel_on_disconnect()(api)``. A view's own setting wins
        over its blueprint's. With the policy ``"off"`` nothing is cancelled.
        """

        def decorate(view: F) -> F:
            self._marks.set(view, Mark.CANCEL_ON_DISCONNECT, enabled)
            return view

        return decorate

    def stats(self, app: Flask | None = None) -> dict[str, t.Any]:
        """Counters of this process for *app* (default: the current app).

        Keys: ``pid``, ``checked_out`` (leases held now), ``checkouts``,
        ``releases`` (by reason), ``exhausted`` (503s), ``client_gone``
        (499s), ``discarded_writes``, ``discarded_connections``,
        ``leak_warnings``, ``finalized``, ``cancelled`` (queries of departed
        clients), ``reclaimed`` (``REQCONN_MAX_HOLD``), ``fallbacks``, and
        ``pools`` with each pool's own counters, wait and hold time
        histograms, current holders and psycopg_pool's ``get_stats()``.
        See the operations page for every key.
        """
        return state_of(app).stats()

    def close(self, app: Flask | None = None) -> None:
        """Close this process's pools for *app*; they reopen on next use."""
        state_of(app).close()

    def health_blueprint(self, *, name: str = "reqconn_health") -> Blueprint:
        """An exempt blueprint with ``/health``, ``/ready`` and ``/stats``.

        See :func:`flask_reqconn.health.health_blueprint`.
        """
        from .health import health_blueprint

        return health_blueprint(self, name=name)

    @contextlib.contextmanager
    def connection(
        self, name: str | None = None, *, app: Flask | None = None, timeout: float | None = None
    ) -> Iterator[psycopg.Connection[t.Any]]:
        """A pool connection outside of requests (CLI commands, scripts, tests).

        The transaction is committed on success and rolled back on error,
        as with psycopg_pool's ``connection()``; then the connection is reset
        like a request's before it goes back.

        :param timeout: seconds to wait for a connection (default ``REQCONN_TIMEOUT``).
        :raises PoolExhausted: no connection in time.
        """
        holder = state_of(app).pools[name or DEFAULT_POOL]
        with holder.connection(timeout=timeout) as conn:
            yield conn
