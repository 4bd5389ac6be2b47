"""``flask reqconn ...``: commands added to the app's CLI by ``init_app``."""

from __future__ import annotations

from flask.cli import AppGroup


def make_cli() -> AppGroup:
    """Build the ``reqconn`` command group (one per app, no import-time state)."""
    group = AppGroup("reqconn", help="flask-reqconn: pool checks and leak hunting.")

    from .storm import make_storm_command

    group.add_command(make_storm_command())
    return group


__all__ = ["make_cli"]
