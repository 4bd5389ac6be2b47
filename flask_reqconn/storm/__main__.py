"""``python -m flask_reqconn.storm URL [options]``: see :func:`flask_reqconn.storm.main`."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
