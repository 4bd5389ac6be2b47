"""A tiny Flask app (no database) for exercising :mod:`flask_reqconn.storm`.

Run it under any WSGI server, e.g. ``flask --app tests/apps/stormtarget.py run``.

Routes:

``/``
    Answers ``ok``.
``/slow``
    Sleeps 0.2 s; counts as "checked out" in ``/stats`` while it runs.
``/stream``
    Streams 20 small chunks with short sleeps; counts drops it notices.
``/leak``
    Increments a counter that is never decremented (a simulated leak).
``/probe``
    Sleeps 0.2 s, then peeks at the client socket and records whether the client is
    still there, sent EOF (FIN) or reset the connection (RST).
``/stats``
    ``{"checked_out": N}``: requests in ``/slow`` + leaks + ``STORMTARGET_CHECKED_OUT``;
    with ``?nested=1``, ``{"pools": {"default": {"checked_out": N}}}``.
``/hits``
    Counters for the tests (probe outcomes, stream drops).
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, jsonify, request

app = Flask(__name__)

_lock = threading.Lock()
_in_flight = 0
_leaked = 0
_hits: Counter[str] = Counter()


def _count(name: str, delta: int = 1) -> None:
    with _lock:
        _hits[name] += delta


@app.get("/")
def index() -> str:
    return "ok"


@app.get("/slow")
def slow() -> str:
    global _in_flight
    with _lock:
        _in_flight += 1
    try:
        time.sleep(0.2)
    finally:
        with _lock:
            _in_flight -= 1
    return "slow ok"


@app.get("/stream")
def stream() -> Response:
    def chunks() -> Iterator[str]:
        try:
            for i in range(20):
                yield f"chunk {i}\n"
                time.sleep(0.02)
            _count("stream_complete")
        except GeneratorExit:
            _count("stream_dropped")
            raise

    return Response(chunks(), mimetype="text/plain")


@app.get("/leak")
def leak() -> str:
    global _leaked
    with _lock:
        _leaked += 1
    return "leaked one"


def _client_socket() -> socket.socket | None:
    for key in ("werkzeug.socket", "gunicorn.socket"):
        sock = request.environ.get(key)
        if isinstance(sock, socket.socket):
            return sock
    return None


@app.get("/probe")
def probe() -> str:
    time.sleep(0.2)
    sock = _client_socket()
    if sock is None:
        _count("probe_unknown")
        return "no socket"
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            outcome = "probe_alive"
        elif sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
            outcome = "probe_eof"
        else:
            outcome = "probe_data"
    except ConnectionResetError:
        outcome = "probe_reset"
    except OSError:
        outcome = "probe_error"
    _count(outcome)
    return outcome


@app.get("/stats")
def stats() -> Any:
    with _lock:
        checked_out = _in_flight + _leaked
    checked_out += int(os.environ.get("STORMTARGET_CHECKED_OUT", "0"))
    if request.args.get("nested"):
        return jsonify(pools={"default": {"checked_out": checked_out}})
    return jsonify(checked_out=checked_out, in_flight=_in_flight, leaked=_leaked)


@app.get("/hits")
def hits() -> Any:
    with _lock:
        return jsonify(dict(_hits))
