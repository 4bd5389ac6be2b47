"""The public API is what ``__all__`` says, and no more."""

from __future__ import annotations

import flask_reqconn


def test_all_is_pinned() -> None:
    assert sorted(flask_reqconn.__all__) == [
        "ClientGone",
        "ConfigError",
        "ConnectionReleased",
        "DatabaseRefused",
        "DatabaseUnavailable",
        "Lease",
        "PoolExhausted",
        "ReleaseReason",
        "ReqConn",
        "ReqConnError",
        "get_conn",
        "state_of",
    ]
    for name in flask_reqconn.__all__:
        assert getattr(flask_reqconn, name).__module__.startswith("flask_reqconn.")


def test_importing_starts_no_threads() -> None:
    import subprocess
    import sys

    code = (
        "import threading, flask_reqconn, flask_reqconn.storm;"
        "print(threading.active_count())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
