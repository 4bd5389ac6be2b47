"""A trivial Flask app for infrastructure tests (no database)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from flask import Flask, Response


def create_app() -> Flask:
    app = Flask(__name__)

    @app.get("/")
    def index() -> str:
        return "hello"

    @app.get("/pid")
    def pid() -> str:
        return str(os.getpid())

    @app.get("/stream")
    def stream() -> Response:
        def generate() -> Iterator[str]:
            yield "first\n"
            for i in range(50):
                time.sleep(0.01)
                yield f"line {i}\n"

        return Response(generate(), mimetype="text/plain")

    return app


app = create_app()
