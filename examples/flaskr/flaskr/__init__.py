"""Flask's tutorial app (flaskr: auth + blog) on PostgreSQL with flask-reqconn.

Configuration comes from the environment, so the same factory serves the development
server, gunicorn and the tests::

    DATABASE_URL=postgresql://... SECRET_KEY=... flask --app flaskr init-db
    DATABASE_URL=postgresql://... SECRET_KEY=... gunicorn 'flaskr:create_app()'
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from flask import Flask
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Create and configure an instance of the app.

    ``DATABASE_URL`` (required unless *test_config* sets ``REQCONN_CONNINFO``),
    ``SECRET_KEY``, ``FLASKR_APPNAME`` (the connections' ``application_name``),
    ``FLASKR_POOL_SIZE``. Rows come back as dicts, by column name, in the whole app.
    """
    app = Flask(__name__)
    app.config.from_mapping(
        SECRET_KEY=os.environ.get("SECRET_KEY", "dev"),
        REQCONN_CONNINFO=os.environ.get("DATABASE_URL", ""),
        REQCONN_MAX_SIZE=int(os.environ.get("FLASKR_POOL_SIZE", "4")),
        REQCONN_CONNECT_ARGS={"row_factory": dict_row},
    )
    if os.environ.get("FLASKR_APPNAME"):
        app.config["REQCONN_CONNINFO"] = make_conninfo(
            app.config["REQCONN_CONNINFO"], application_name=os.environ["FLASKR_APPNAME"]
        )
    if test_config is not None:
        app.config.from_mapping(test_config)
    if os.environ.get("FLASKR_LOG_LEVEL"):
        # the library configures no logging: the INFO lines for 499s (clients that left
        # before their connection was used) appear only once the app configures it
        logging.basicConfig(level=os.environ["FLASKR_LOG_LEVEL"])

    from . import auth, blog, db

    db.init_app(app)
    app.register_blueprint(auth.bp)
    app.register_blueprint(blog.bp)
    app.add_url_rule("/", endpoint="index")
    return app
