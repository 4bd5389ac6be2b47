"""The database: one flask-reqconn extension, the schema and the ``init-db`` command."""

from __future__ import annotations

from importlib import resources

import click
from flask import Flask
from flask.cli import with_appcontext

from flask_reqconn import ReqConn

reqconn = ReqConn()


def init_db() -> None:
    """Drop and create the tables, outside of any request.

    ``reqconn.connection()`` takes a pool connection of the current app, commits on
    success and rolls back on error.
    """
    schema = resources.files("flaskr").joinpath("schema.sql").read_text(encoding="utf-8")
    with reqconn.connection() as conn:  # the current app's default pool
        conn.execute(schema.encode())  # several statements: no parameters, one script


@click.command("init-db")
@with_appcontext
def init_db_command() -> None:
    """Clear the existing data and create new tables."""
    init_db()
    click.echo("Initialized the database.")


def init_app(app: Flask) -> None:
    reqconn.init_app(app)
    app.register_blueprint(reqconn.health_blueprint())  # /health, /ready, /stats
    app.cli.add_command(init_db_command)
