"""Per-view decisions: eager checkout, read-only routing, cancel on disconnect.

The decorators of :class:`~flask_reqconn.ReqConn` (``exempt``, ``read_only``,
``cancel_on_disconnect``) mark view functions and blueprints, all three the
same way (:class:`Marks`). Each app decides once per endpoint from those
marks and its settings, and caches the answer (:class:`Policy`).

A view's own mark wins over its blueprints'; among blueprints, the innermost
marked one wins. Blueprints are matched by object, through the names they are
registered under (``app.blueprints``): a blueprint registered under another
name, or two blueprints of the same name nested in different parents, are
told apart.
"""

from __future__ import annotations

import enum
import typing as t
from collections.abc import Callable, Mapping

from flask import current_app, request
from flask.sansio.blueprints import Blueprint

from .config import SAFE_METHODS, AppSettings


class Mark(str, enum.Enum):
    """What a decorator marks a view or a blueprint with."""

    #: no eager checkout (``ReqConn.exempt``)
    EXEMPT = "exempt"
    #: read-only connection from the read pool (``ReqConn.read_only``)
    READ_ONLY = "read_only"
    #: override of ``REQCONN_CANCEL_ON_DISCONNECT`` (``ReqConn.cancel_on_disconnect``)
    CANCEL_ON_DISCONNECT = "cancel_on_disconnect"


#: The attribute a marked view function carries (it survives ``functools.wraps``).
_ATTRS = {mark: f"_flask_reqconn_{mark.value}" for mark in Mark}


class Marks:
    """The marks set by one :class:`~flask_reqconn.ReqConn`'s decorators, for any app."""

    def __init__(self) -> None:
        self._blueprints: dict[Mark, dict[Blueprint, bool]] = {mark: {} for mark in Mark}
        #: views that take no attributes (bound methods, builtins)
        self._views: dict[Mark, dict[t.Any, bool]] = {mark: {} for mark in Mark}

    def set(self, target: t.Any, mark: Mark, value: bool = True) -> None:
        """Mark a view function or a blueprint."""
        if isinstance(target, Blueprint):
            self._blueprints[mark][target] = value
            return
        try:
            setattr(target, _ATTRS[mark], value)
        except (AttributeError, TypeError):
            self._views[mark][target] = value

    def of_view(self, view: Callable[..., t.Any] | None, mark: Mark) -> bool | None:
        """The view's own mark, or None."""
        if view is None:
            return None
        value = getattr(view, _ATTRS[mark], None)
        if value is None:
            try:
                value = self._views[mark].get(view)
            except TypeError:  # unhashable
                return None
        return None if value is None else bool(value)

    def of_blueprints(
        self, names: t.Iterable[str], registered: Mapping[str, Blueprint], mark: Mark
    ) -> bool | None:
        """The mark of the innermost marked blueprint among *names* (innermost first).

        :param names: the registered names of a request's blueprints (``request.blueprints``).
        :param registered: the app's blueprints by registered name (``app.blueprints``).
        """
        marked = self._blueprints[mark]
        if not marked:
            return None
        for name in names:
            blueprint = registered.get(name)
            if blueprint is not None:
                value = marked.get(blueprint)
                if value is not None:
                    return value
        return None

    def of_endpoint(self, endpoint: str | None, mark: Mark) -> bool | None:
        """The mark of the current request's view, else of its blueprints, else None."""
        app = current_app
        value = self.of_view(app.view_functions.get(endpoint or ""), mark)
        if value is None:
            value = self.of_blueprints(request.blueprints, app.blueprints, mark)
        return value


K = t.TypeVar("K")


class Decisions(dict[K, bool]):
    """One decision per key, made by *decide* on the first lookup and kept: reading
    ``decisions[key]`` is a plain dict lookup from then on."""

    __slots__ = ("decide",)

    def __init__(self, decide: Callable[[K], bool]) -> None:
        super().__init__()
        self.decide = decide

    def __missing__(self, key: K) -> bool:
        value = self[key] = self.decide(key)
        return value


class Policy:
    """One app's decisions for its endpoints, each made once (:class:`Decisions`).

    ``policy.eager[endpoint]``, ``policy.read_only[endpoint]`` and
    ``policy.cancel_armed[endpoint, method]``.
    """

    def __init__(self, marks: Marks, settings: AppSettings) -> None:
        self.marks = marks
        self.settings = settings
        #: does this endpoint get its connection before the view (eager mode)?
        self.eager: Decisions[str | None] = Decisions(self._eager)
        #: is this endpoint's view marked with :meth:`ReqConn.read_only`?
        self.read_only: Decisions[str | None] = Decisions(self._read_only)
        #: should a request's queries be cancelled when its client leaves?
        self.cancel_armed: Decisions[tuple[str | None, str]] = Decisions(self._cancel_armed)

    def __repr__(self) -> str:
        s = self.settings
        return f"<Policy checkout={s.checkout} cancel={s.cancel_on_disconnect}>"

    def _eager(self, endpoint: str | None) -> bool:
        return (
            endpoint is not None
            and endpoint not in self.settings.exempt_endpoints
            and endpoint != "static"
            and not endpoint.endswith(".static")
            and not self.marks.of_endpoint(endpoint, Mark.EXEMPT)
            and not self.read_only[endpoint]  # routed to the read pool, lazily
        )

    def _read_only(self, endpoint: str | None) -> bool:
        return bool(self.marks.of_endpoint(endpoint, Mark.READ_ONLY))

    def _cancel_armed(self, key: tuple[str | None, str]) -> bool:
        endpoint, method = key
        policy = self.settings.cancel_on_disconnect
        override = self.marks.of_endpoint(endpoint, Mark.CANCEL_ON_DISCONNECT)
        if policy == "off":
            return False
        if override is not None:
            return override
        return policy == "all" or method in SAFE_METHODS
