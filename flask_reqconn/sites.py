"""Where a request took its connection, for leak reports.

Only used with leak detection on (``REQCONN_LEAK_THRESHOLD``).

- An eager checkout runs in flask-reqconn's own ``before_request`` hook, before
  the view: the stack holds no code of the app's that will use the connection
  (at most the app's WSGI middleware, around it), so its site is the view
  itself (:func:`view_site`), with no walk.
- Any other checkout is a ``get_conn()`` call (:func:`checkout_site`). The frames
  of the app are found as Flask-SQLAlchemy's ``record_queries`` finds them: by the
  module name against the app's ``import_name`` (its top-level package), plus the
  view function itself, wherever it is defined. Frames are walked outward from
  the checkout up to Flask's dispatch of the view, without reading source lines
  (cheap enough for every checkout).
"""

from __future__ import annotations

import inspect
import os
import sys
import typing as t
import weakref

from flask import current_app, request

#: How many frames the walk looks at, and how many app frames it reports.
_MAX_FRAMES = 60
_MAX_SITES = 3
#: Flask's frames right above the view: its call, a ``stream_with_context`` body.
_DISPATCH = frozenset({("flask.app", "dispatch_request"), ("flask.helpers", "generator")})


def checkout_site() -> str | None:
    """Where ``get_conn()`` was called: the app's frames inside the view (innermost
    first), else the view itself (a call from outside the app's modules).

    An ``async def`` view's coroutine runs in asgiref's thread, where Flask's
    dispatch is not up the stack: its frames are all the walk finds.
    """
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    view = _view_of(app)
    top = app.import_name.partition(".")[0]
    prefix = f"{top}."
    view_code = _code_of(view)
    found: list[str] = []
    frame = sys._getframe(1)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            break
        code = frame.f_code
        module = frame.f_globals.get("__name__") or ""
        if (module, code.co_name) in _DISPATCH:
            if found:
                return " <- ".join(found[:_MAX_SITES])
            break
        if code is view_code or module == top or module.startswith(prefix):
            found.append(f"{os.path.basename(code.co_filename)}:{frame.f_lineno} in {code.co_name}")
        frame = frame.f_back  # type: ignore[assignment]
    if found:  # no dispatch on this thread: an async view's coroutine, in asgiref's thread
        return " <- ".join(found[:_MAX_SITES])
    return _view_site(view, view_code, "view")


def view_site() -> str | None:
    """The current request's view, where an eager checkout names it (None: no view)."""
    view = _view_of(current_app._get_current_object())  # type: ignore[attr-defined]
    return _view_site(view, _code_of(view), "view, eager checkout")


def _view_of(app: t.Any) -> t.Callable[..., t.Any] | None:
    """*app*'s view of the current request (None: no view).

    Through the objects behind Flask's proxies: an attribute read through a proxy
    costs the message of an ``AttributeError`` first.
    """
    endpoint = request._get_current_object().endpoint  # type: ignore[attr-defined]
    return app.view_functions.get(endpoint or "")  # type: ignore[no-any-return]


#: Each view's own code, once found (weakly: apps come and go, in test suites most of
#: all). A lazy checkout with leak detection on counts 8 000 instructions fewer with it.
_codes: weakref.WeakKeyDictionary[t.Callable[..., t.Any], t.Any] = weakref.WeakKeyDictionary()


def _code_of(view: t.Callable[..., t.Any] | None) -> t.Any:
    """The code of *view*'s own function, under its decorators (None: not a function)."""
    if view is None:
        return None
    try:
        return _codes[view]
    except KeyError:
        code = _codes[view] = getattr(inspect.unwrap(view), "__code__", None)
        return code
    except TypeError:  # a view that cannot be referenced weakly (a slotted callable)
        return getattr(inspect.unwrap(view), "__code__", None)


def _view_site(view: t.Callable[..., t.Any] | None, code: t.Any, what: str) -> str | None:
    """Where *view* (whose own code is *code*) is defined, as leak reports name it, with
    *what* in brackets."""
    if code is None:
        return None
    name = getattr(view, "__qualname__", "?")
    return f"{code.co_filename}:{code.co_firstlineno} in {name} ({what})"
