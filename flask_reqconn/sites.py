"""Where a request took its connection, for leak reports.

Only used with leak detection on (``REQCONN_LEAK_THRESHOLD``). The frames of
the app are found as Flask-SQLAlchemy's ``record_queries`` finds them: by the
module name against the app's ``import_name`` (its top-level package), plus
the view function itself, wherever it is defined. Frames are walked outward
from the checkout up to Flask's dispatch of the view, without reading source
lines (cheap enough for every checkout).
"""

from __future__ import annotations

import inspect
import os
import sys

from flask import current_app, request

#: How many frames the walk looks at, and how many app frames it reports.
_MAX_FRAMES = 60
_MAX_SITES = 3
#: Flask's frames right above the view: its call, a ``stream_with_context`` body.
_DISPATCH = frozenset({("flask.app", "dispatch_request"), ("flask.helpers", "generator")})


def checkout_site() -> str | None:
    """The app's frames inside the view (innermost first), else the view itself.

    The view is named for an eager checkout, which runs before the view: its
    definition is the best guess of who will use the connection. An ``async def``
    view's coroutine runs in asgiref's thread, where Flask's dispatch is not up the
    stack: its frames are all the walk finds.
    """
    app = current_app
    top = app.import_name.partition(".")[0]
    prefix = f"{top}."
    view = app.view_functions.get(request.endpoint or "")
    view_code = getattr(inspect.unwrap(view), "__code__", None) if view is not None else None
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
    if view_code is None:
        return None
    name = getattr(view, "__qualname__", "?")
    return f"{view_code.co_filename}:{view_code.co_firstlineno} in {name} (view, eager checkout)"
