"""The one small app every benchmark variant serves, built by :func:`create_app`.

gunicorn loads it as ``benchapp:create_app()`` (with ``--pythonpath bench``); the
variant and the database come from the environment:

``BENCH_VARIANT``
    ``bare`` (a), ``eager`` (b), ``lazy`` (c), ``fsqla`` (d), ``plain`` (e), ``fsqlarc``
    (Flask-SQLAlchemy on flask-reqconn's pool, for ``bench/sqla.py``); ``eager``
    and ``lazy`` take suffixes that switch one safety feature off each
    (:data:`FEATURE_SWITCHES`), e.g. ``eager-noreset`` or ``eager-nocheck-nocancel``;
    ``fsqla`` takes suffixes that add the engine options real apps set on their own
    ``QueuePool`` (:data:`FSQLA_SWITCHES`): ``fsqla-preping``, ``fsqla-preping-recycle``.
    ``plainshape`` and ``bareshape`` are ``plain`` and ``bare`` with the design's empty
    shape added (:func:`_shape`): the floor of any extension built that way.
    ``floor`` is that shape with a connection in it (:func:`_floor`): checked out in
    ``before_request``, handed back with the library's hand-back SQL in
    ``teardown_request``, nothing else. Its suffixes add one guarantee back each, in
    its least form (:data:`FLOOR_GUARANTEES`, combinable: ``floor-guard-owner``;
    ``floor-all`` is :data:`FLOOR_ALL`), to price each one.
``BENCH_DSN``
    libpq conninfo of the PostgreSQL to use (seeded by ``run.py``).
``BENCH_POOL_SIZE``
    Connections per worker process, for every variant (min = max, so no variant
    pays for growing its pool during a measurement).
``BENCH_ROWS``
    Rows in the seeded ``bench_items`` table.
``BENCH_APPNAME``
    ``application_name`` of the pool's connections (default ``bench_<variant>``).

Endpoints, identical in every variant that has them:

``/select1``  ``SELECT 1``
``/read``     one indexed lookup (unique index on ``sku``) of a random seeded row, as JSON
``/nodb``     no database at all
``/stream``   (bare and flask-reqconn variants) a short streamed body that queries
``/upload``   (bare and flask-reqconn variants) ``POST``: reads the body, then one query
              with its size; bare reads it inside ``with pool.connection()``, as a view
              wrapped whole in the block does
``/upload-first``  (bare) the same, the body read before the block
``/stats``    (flask-reqconn variants) ``ReqConn.stats()`` of the worker that answers
``/orm``      (Flask-SQLAlchemy variants) ``/read`` as a typical API view writes it: the
              row as an ORM model (``Item``), ``select(Item).filter_by(sku=...)``
``/ormwrite`` (Flask-SQLAlchemy variants) a typical update view: load an ``Item``, change
              its price, ``db.session.commit()``, return it as JSON (its attributes,
              expired by the commit, are loaded again in a second transaction)
``/ormpage``  (Flask-SQLAlchemy variants) a typical list view: ``db.paginate()`` of the
              items in a range of 50 SKUs, 20 per page, ordered: two queries (the
              page and its ``count()``), each with more to plan than ``/read``'s
"""

from __future__ import annotations

import bisect
import collections
import errno
import os
import random
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, jsonify, request, stream_with_context

SELECT1_SQL = "SELECT 1"
UPLOAD_SQL = "SELECT %s::int"
READ_SQL = "SELECT id, sku, name, price_cents FROM bench_items WHERE sku = %s"
READ_SQL_SQLA = "SELECT id, sku, name, price_cents FROM bench_items WHERE sku = :sku"
APPLICATION_NAME_PREFIX = "bench_"

VARIANTS = (
    "bare", "eager", "lazy", "fsqla", "plain", "fsqlarc", "plainshape", "bareshape", "floor"
)  # fmt: skip
#: Suffixes for ``eager`` and ``lazy`` that switch one feature off (or on) each,
#: combinable (``eager-noreset-nocheck``): what each safety feature costs.
FEATURE_SWITCHES: dict[str, dict[str, Any]] = {
    "noreset": {"REQCONN_RESET_SESSION": False},
    "nocheck": {"REQCONN_CHECK_CLIENT": False},
    "nocancel": {"REQCONN_CANCEL_ON_DISCONNECT": "off"},
    "noprep": {"REQCONN_CONNECT_ARGS": {"prepare_threshold": None}},
    "leak": {"REQCONN_LEAK_THRESHOLD": 30},
    # not a setting: PrometheusMetrics on the app, in a registry of its own
    "metrics": {"BENCH_METRICS": True},
}
#: Suffixes for ``fsqla`` (the app on its own ``QueuePool``), combinable: the
#: ``SQLALCHEMY_ENGINE_OPTIONS`` real Flask-SQLAlchemy apps add to theirs.
#: ``pool_pre_ping`` runs ``SELECT 1`` (one more round trip) at every checkout;
#: ``pool_recycle`` replaces connections older than that many seconds (a time check
#: per checkout; none is that old during a benchmark). ``fsqlarc`` refuses both
#: (flask-reqconn's pool checks and replaces its connections itself).
FSQLA_SWITCHES: dict[str, dict[str, Any]] = {
    "preping": {"pool_pre_ping": True},
    "recycle": {"pool_recycle": 3600},
}


#: Suffixes for ``floor``, combinable (``floor-guard-owner``): each adds one guarantee
#: of the design back to the floor, in its least form (see :func:`_floor`).
FLOOR_GUARANTEES: dict[str, str] = {
    "guard": "WSGI wrapper: release when an exception leaves the app, or at the close()"
    " of a streamed response",
    "check": "client check before the pool wait: a new poll object, then MSG_PEEK"
    " (flask_reqconn.probes.socket_gone)",
    "checkpoll": "the same check with one poll object per thread, kept between requests",
    "owner": "LeasedConnection: the owner context variable set per request, own() at"
    " checkout and release",
    "live": "liveness check of the pooled connection's socket"
    " (flask_reqconn.connection.server_gone)",
    "count": "counters: checkouts and releases, plain integers",
    "hist": "counters and the wait and hold time histograms (Histogram.observe)",
    "noreset": "hand-back without the session reset: the write check and ROLLBACK",
    "rollback": "hand-back: ROLLBACK alone (no write check, no reset)",
    "hold": "REQCONN_MAX_HOLD: the socket's identity (flask_reqconn.connection.socket_id) and"
    " the connection queued for a watcher thread (a deque append)",
    "lease": "a lease object per request: a threading.Lock (exactly-once release) and a"
    " finalizer (__del__)",
    # cuts proposed, priced against what they replace
    "livepoll": "live, cut: the connection's status read once, a poll object per thread for"
    " its socket, server_gone() only when something arrived",
    "histlazy": "hist, cut: the raw durations appended to a list, sorted into the buckets"
    " every 64 (or when stats() asks)",
    "checklive": "check and live, cut: one poll call for the client's socket and the"
    " connection's, after getconn(); the client checked before it only if no connection"
    " is idle (a wait may come)",
}
#: ``floor-all``: every guarantee at once, the cheaper client check of the two.
FLOOR_ALL = ("guard", "checkpoll", "owner", "live", "hist", "hold", "lease")


def parse_variant(variant: str) -> tuple[str, dict[str, Any]]:
    """``"eager-noreset-nocheck"`` -> ``("eager", {REQCONN_* overrides})``;
    ``"floor-guard-owner"`` -> ``("floor", {"floor": frozenset({"guard", "owner"})})``."""
    base, *switches = variant.split("-")
    if base == "floor":
        names = [n for s in switches for n in (FLOOR_ALL if s == "all" else (s,))]
        if unknown := [n for n in names if n not in FLOOR_GUARANTEES]:
            raise ValueError(
                f"unknown guarantee {unknown[0]!r} in {variant!r}; known: all,"
                f" {', '.join(FLOOR_GUARANTEES)}"
            )
        return base, {"floor": frozenset(names)}
    if base not in VARIANTS or (switches and base not in ("eager", "lazy", "fsqla")):
        raise ValueError(f"unknown BENCH_VARIANT {variant!r}; choose from {', '.join(VARIANTS)}")
    known = FSQLA_SWITCHES if base == "fsqla" else FEATURE_SWITCHES
    config: dict[str, Any] = {}
    for switch in switches:
        if switch not in known:
            raise ValueError(
                f"unknown switch {switch!r} in {variant!r}; known: {', '.join(known)}"
            )
        config.update(known[switch])
    return base, config


def sku_of(n: int) -> str:
    """The ``sku`` of seeded row *n* (1-based)."""
    return f"SKU-{n:08d}"


def _row_json(row: Any) -> dict[str, Any]:
    return {"id": row[0], "sku": row[1], "name": row[2], "price_cents": row[3]}


def create_app(variant: str | None = None, **reqconn_config: Any) -> Flask:
    """Build the app of *variant* (default ``$BENCH_VARIANT``).

    :param reqconn_config: extra ``REQCONN_*`` keys for the flask-reqconn variants
        (the microbenchmark uses it to switch single features off).
    """
    variant = variant or os.environ["BENCH_VARIANT"]
    base, switches = parse_variant(variant)
    dsn = os.environ.get("BENCH_DSN", "")
    pool_size = int(os.environ.get("BENCH_POOL_SIZE", "4"))
    rows = int(os.environ.get("BENCH_ROWS", "100000"))
    app = Flask(f"bench_{variant.replace('-', '_')}")
    appname = os.environ.get("BENCH_APPNAME") or APPLICATION_NAME_PREFIX + variant.replace("-", "_")

    def random_sku() -> str:
        return sku_of(random.randint(1, rows))

    @app.get("/nodb")
    def nodb() -> str:
        return "ok"

    if base in ("plainshape", "bareshape"):
        _shape(app)
    if base in ("plain", "plainshape"):
        return app

    if base in ("bare", "bareshape"):
        _bare(app, dsn, appname, pool_size, random_sku)
    elif base == "floor":
        _floor(app, dsn, appname, pool_size, random_sku, switches["floor"])
    elif base in ("fsqla", "fsqlarc"):
        _fsqla(
            app, dsn, appname, pool_size, random_sku, reqconn=base == "fsqlarc",
            engine_options=switches,
        )  # fmt: skip
    else:
        _reqconn(app, base, dsn, appname, pool_size, random_sku, {**switches, **reqconn_config})
    return app


class _PassThrough:
    """A WSGI wrapper that does nothing (for :func:`_shape`)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: Any, start_response: Any) -> Any:
        return self.app(environ, start_response)


def _shape(app: Flask) -> None:
    """The design's shape with nothing in it: a ``before_request``, an ``after_request``
    and a ``teardown_request`` function that do nothing, registered as ``init_app``
    registers flask-reqconn's (``functools.partial`` of a module function), and a WSGI
    wrapper that passes through. What any extension built that way costs at least."""
    import functools

    def before(state: object) -> None:
        return None

    def after(state: object, response: Any) -> Any:
        return response

    def teardown(state: object, exc: BaseException | None = None) -> None:
        return None

    state = object()
    app.before_request(functools.partial(before, state))
    app.after_request(functools.partial(after, state))
    app.teardown_request(functools.partial(teardown, state))
    app.wsgi_app = _PassThrough(app.wsgi_app)  # type: ignore[method-assign]


def _bare(app: Flask, dsn: str, appname: str, pool_size: int, random_sku: Any) -> None:
    """(a): what a user writes by hand, a module-level pool and ``with pool.connection()``.

    gunicorn imports the app in each worker (no ``--preload``), so the pool opens in
    the worker, as it would in such an app.
    """
    from psycopg_pool import ConnectionPool

    pool: ConnectionPool[Any] = ConnectionPool(
        dsn,
        min_size=pool_size,
        max_size=pool_size,
        kwargs={"application_name": appname},
        name=appname,
        open=True,
    )
    app.extensions["bench_pool"] = pool  # for the microbenchmark's timers

    @app.get("/select1")
    def select1() -> str:
        with pool.connection() as conn:
            row = conn.execute(SELECT1_SQL).fetchone()
        return str(row[0]) if row else ""

    @app.get("/read")
    def read() -> Response:
        with pool.connection() as conn:
            row = conn.execute(READ_SQL, (random_sku(),)).fetchone()
        return jsonify(_row_json(row))

    @app.get("/stream")
    def stream() -> Response:
        def body() -> Iterator[str]:
            with pool.connection() as conn:
                for _ in range(5):
                    row = conn.execute(READ_SQL, (random_sku(),)).fetchone()
                    yield f"{row[1] if row else '-'}\n"

        return Response(body(), mimetype="text/plain")

    @app.post("/upload")
    def upload() -> str:
        with pool.connection() as conn:
            size = len(request.get_data())
            row = conn.execute(UPLOAD_SQL, (size,)).fetchone()
        return str(row[0]) if row else ""

    @app.post("/upload-first")
    def upload_first() -> str:
        size = len(request.get_data())
        with pool.connection() as conn:
            row = conn.execute(UPLOAD_SQL, (size,)).fetchone()
        return str(row[0]) if row else ""


# --------------------------------------------------------------------------------------
# The floor of the design, and each guarantee added back to it (issue 22)
# --------------------------------------------------------------------------------------

#: Where the floor keeps the request's connection (or its lease): on the request object.
FLOOR_ATTR = "bench_floor"
#: ``guard``: the connection (or lease) in the WSGI environ while teardown may release it
FLOOR_HELD = "bench.floor.held"
#: ``guard``: a streamed response's connection, released at the body's ``close()``
FLOOR_STREAM = "bench.floor.stream"
#: ``hold``: seconds a connection may be held before the watcher shuts its socket down
FLOOR_MAX_HOLD = 120.0
_POLL_MASK = select.POLLIN | select.POLLERR | select.POLLHUP
_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT
_GONE_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.EBADF})
_CONN_OK = 0  # libpq's CONNECTION_OK (psycopg.pq.ConnStatus.OK)
_FOLD_EVERY = 64


class _FloorHistogram:
    """``hist``: a fixed-bucket histogram that counts each duration as it comes (the
    library's :class:`~flask_reqconn.stats.Histogram` before it took batches)."""

    __slots__ = ("count", "total", "_counts", "_buckets")

    def __init__(self) -> None:
        from flask_reqconn.stats import BUCKETS

        self.count = 0
        self.total = 0.0
        self._counts = [0] * (len(BUCKETS) + 1)
        self._buckets = BUCKETS

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        self._counts[bisect.bisect_left(self._buckets, value)] += 1


class _FloorState:
    """What the floor's hooks share (``init_app``'s per-app state)."""

    __slots__ = (
        "pool", "checkouts", "releases", "wait_time", "hold_time", "waits", "holds", "buckets",
        "orphans", "watcher",
    )  # fmt: skip

    def __init__(self, pool: Any) -> None:
        from flask_reqconn.stats import BUCKETS

        self.pool = pool
        self.checkouts = 0
        self.releases = 0
        self.wait_time = _FloorHistogram()
        self.hold_time = _FloorHistogram()
        #: ``histlazy``: durations not yet in :attr:`wait_time` and :attr:`hold_time`
        self.waits: list[float] = []
        self.buckets = BUCKETS
        self.holds: list[float] = []
        #: ``lease``: connections whose lease was dropped while held (its finalizer's)
        self.orphans: collections.deque[Any] = collections.deque()
        self.watcher: _HoldWatcher | None = None

    def fold(self) -> None:
        """``histlazy``: sort the durations kept so far into the histograms."""
        for values, histogram in ((self.waits, self.wait_time), (self.holds, self.hold_time)):
            taken = sorted(values)
            del values[: len(taken)]  # appended since: at the end, kept
            histogram.count += len(taken)
            histogram.total += sum(taken)
            counts = histogram._counts
            below = 0
            for i, bound in enumerate(self.buckets):
                upto = bisect.bisect_right(taken, bound, below)  # <= bound: Histogram's bucket
                counts[i] += upto - below
                below = upto
            counts[-1] += len(taken) - below


class _FloorOwner:
    """``owner``: the request that holds a connection; no one else may use it."""

    __slots__ = ()

    def refusal(self) -> str:
        return "this connection belongs to another request"


class _HandedBack:
    """``owner``: a connection given back; nobody may use it until its next checkout."""

    __slots__ = ()

    def refusal(self) -> str:
        return "this connection was handed back and may be serving another request"


_HANDED_BACK = _HandedBack()


class _FloorLease:
    """``lease``: a request's hold on its connection, taken back exactly once (under its
    lock, which a watcher would take to act on it), and returned at the next checkout by
    its finalizer if it is dropped while held."""

    __slots__ = ("conn", "lock", "orphans")

    def __init__(self, conn: Any, orphans: collections.deque[Any]) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.orphans = orphans

    def take(self) -> Any:
        with self.lock:
            conn = self.conn
            self.conn = None
        return conn

    def __del__(self) -> None:
        if self.conn is not None:
            self.orphans.append(self.conn)


class _HoldWatcher(threading.Thread):
    """``hold``: every second, shut down the socket of any connection held longer than
    :data:`FLOOR_MAX_HOLD` (the request then fails, and its connection is discarded).

    The request thread appends ``[checked out at, socket id, connection]`` at checkout
    and, at release, clears the entry under :attr:`lock` and takes it off the queue if
    it is the newest (as ``flask_reqconn.lease.PendingClients`` does).
    """

    def __init__(self) -> None:
        from flask_reqconn.connection import socket_id

        super().__init__(name="bench-floor-watcher", daemon=True)
        self.socket_id = socket_id
        self.queue: collections.deque[list[Any]] = collections.deque()
        self.lock = threading.Lock()
        self.start()

    def run(self) -> None:
        while True:
            time.sleep(1.0)
            self.tick(time.monotonic())

    def tick(self, now: float) -> None:
        queue = self.queue
        while True:
            try:
                entry = queue.popleft()
            except IndexError:
                return
            if entry[2] is None:
                continue  # released
            if now - entry[0] < FLOOR_MAX_HOLD:
                queue.appendleft(entry)  # the oldest held: the rest are younger
                return
            with self.lock:
                if entry[2] is not None and entry[1] is not None:
                    _shut_down(*entry[1])

    def add(self, conn: Any, at: float) -> list[Any]:
        sid = getattr(conn, "sock_id", None)  # asked once per connection
        if sid is None:
            sid = conn.sock_id = self.socket_id(conn)
        entry = [at, sid, conn]
        self.queue.append(entry)
        return entry

    def remove(self, entry: list[Any]) -> None:
        with self.lock:
            entry[2] = None
        queue = self.queue
        try:
            last = queue.pop()
        except IndexError:
            return
        if last is not entry:
            queue.append(last)


def _shut_down(fd: int, inode: int) -> None:
    """Shut a connection's socket down from another thread, if it is still that socket."""
    try:
        dup = os.dup(fd)
    except OSError:
        return
    with socket.socket(fileno=dup) as sock:
        if os.fstat(dup).st_ino == inode:
            sock.shutdown(socket.SHUT_RDWR)


class _ThreadPoll(threading.local):
    """``checkpoll``: one poll object per thread, registered for the last client socket."""

    def __init__(self) -> None:
        self.poll = select.poll()
        self.fd = -1


def _server_gone_polled(conn: Any, local: _ThreadPoll, server_gone: Any) -> bool:
    """``livepoll``: ``flask_reqconn.connection.server_gone`` with the thread's poll object,
    asked only when the connection's socket has something to read."""
    pgconn = conn.pgconn
    if pgconn.status != _CONN_OK:
        return True  # closed or broken
    fd = pgconn.socket
    poll = local.poll
    if fd != local.fd:
        if local.fd >= 0:
            poll.unregister(local.fd)
        poll.register(fd, _POLL_MASK)
        local.fd = fd
    if not poll.poll(0):
        return False
    return bool(server_gone(conn))


def _both_polled(sock: Any, conn: Any, socket_gone: Any, server_gone: Any) -> int:
    """``checklive``: one ``poll()`` for the client's socket and the pooled connection's.

    :returns: 0 when neither has anything to read (the usual case), else 1 for a client
        seen gone, 2 for a connection whose server is gone (both: 3), as
        ``socket_gone`` and ``server_gone`` tell.
    """
    pgconn = conn.pgconn
    if pgconn.status != _CONN_OK:
        return 2
    fd = pgconn.socket
    poll = select.poll()
    poll.register(fd, _POLL_MASK)
    client = sock.fileno() if sock is not None else -1
    if client >= 0:
        poll.register(client, _POLL_MASK)
    if not poll.poll(0):
        return 0
    return (1 if client >= 0 and socket_gone(sock) else 0) | (2 if server_gone(conn) else 0)


def _client_gone_polled(sock: socket.socket, local: _ThreadPoll) -> bool:
    """``flask_reqconn.probes.socket_gone`` with the thread's poll object."""
    try:
        fd = sock.fileno()
        if fd < 0:
            return True
        poll = local.poll
        if fd != local.fd:
            if local.fd >= 0:
                poll.unregister(local.fd)
            poll.register(fd, _POLL_MASK)
            local.fd = fd
        if not poll.poll(0):
            return False
        data = sock.recv(1, _PEEK_FLAGS)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError as exc:
        return exc.errno in _GONE_ERRNOS
    return not data


class _FloorGuard:
    """``guard``: the WSGI wrapper. An exception leaving the app releases what teardown
    did not; a streamed response's connection is released at its body's ``close()``."""

    def __init__(self, app: Any, release: Any) -> None:
        self.app = app
        self.release = release

    def __call__(self, environ: Any, start_response: Any) -> Any:
        try:
            body = self.app(environ, start_response)
        except BaseException:
            held = environ.pop(FLOOR_HELD, None) or environ.pop(FLOOR_STREAM, None)
            if held is not None:
                self.release(held)
            raise
        if environ.get(FLOOR_STREAM) is None:
            return body
        return _FloorBody(body, environ, self.release)


class _FloorBody:
    """``guard``: a streamed response's body, which releases at ``close()``."""

    __slots__ = ("body", "environ", "release")

    def __init__(self, body: Any, environ: Any, release: Any) -> None:
        self.body = body
        self.environ = environ
        self.release = release

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.body)

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            held = self.environ.pop(FLOOR_STREAM, None)
            if held is not None:
                self.release(held)


def _floor(
    app: Flask, dsn: str, appname: str, pool_size: int, random_sku: Any, guarantees: frozenset[str]
) -> None:
    """The floor of the design, with *guarantees* (:data:`FLOOR_GUARANTEES`) added back.

    The floor is :func:`_shape` with a connection in it and nothing more: the pool of
    ``bare``; ``before_request`` takes a connection (``getconn()``) and puts it on the
    request object; the views find it there (:func:`get_conn`, one lookup);
    ``teardown_request`` sends the library's hand-back SQL for the connection's
    transaction status with the session reset on (``flask_reqconn.connection._SQL``, one
    ``PQexec`` under the connection's lock, as ``connection._run`` does; a write check that
    failed is followed by the rollback of a failed transaction) and ``putconn()``\\ s it.
    Each guarantee is a branch taken or not; the branches cost a few hundred
    instructions per request together, below what two counts of the same code differ by.
    """
    import functools

    from psycopg.pq import TransactionStatus
    from psycopg_pool import ConnectionPool

    from flask_reqconn.connection import _SQL as HANDBACK_SQL
    from flask_reqconn.connection import LeasedConnection, current_owner, own, server_gone
    from flask_reqconn.errors import ClientGone
    from flask_reqconn.probes import socket_gone

    guard = "guard" in guarantees
    check = "check" in guarantees
    checkpoll = "checkpoll" in guarantees
    owner = "owner" in guarantees
    live = "live" in guarantees
    livepoll = "livepoll" in guarantees
    lazy = "histlazy" in guarantees
    checklive = "checklive" in guarantees
    hist = "hist" in guarantees or lazy
    count = "count" in guarantees or hist
    hold = "hold" in guarantees
    lease = "lease" in guarantees
    intrans, inerror, idle = (
        TransactionStatus.INTRANS, TransactionStatus.INERROR, TransactionStatus.IDLE
    )  # fmt: skip
    if "rollback" in guarantees:
        sql = {intrans: b"ROLLBACK", inerror: b"ROLLBACK"}
    else:
        reset = "noreset" not in guarantees
        sql = {status: text for (status, r), text in HANDBACK_SQL.items() if r == reset}
    failed_sql = sql[inerror]
    monotonic = time.monotonic
    thread_poll = _ThreadPoll()
    pg_poll = _ThreadPoll()

    pool: ConnectionPool[Any] = ConnectionPool(
        dsn,
        min_size=pool_size,
        max_size=pool_size,
        kwargs={"application_name": appname},
        name=appname,
        open=True,
        **({"connection_class": LeasedConnection} if owner else {}),
    )
    app.extensions["bench_pool"] = pool  # closed by micro.close_app
    state = _FloorState(pool)
    if hold:
        state.watcher = _HoldWatcher()

    def fresh(state: _FloorState, conn: Any) -> Any:
        """``live``: replace *conn*, whose server is gone (at most pool_size times)."""
        for _ in range(pool_size):
            conn.close()
            state.pool.putconn(conn)  # closed: the pool replaces it
            conn = state.pool.getconn()
            if not server_gone(conn):
                break
        return conn

    def before(state: _FloorState) -> None:
        rq = request._get_current_object()  # type: ignore[attr-defined]
        if check or checkpoll:
            sock = rq.environ.get("gunicorn.socket")
            if type(sock) is socket.socket and (
                _client_gone_polled(sock, thread_poll) if checkpoll else socket_gone(sock)
            ):
                raise ClientGone()
        if lease and state.orphans:
            while state.orphans:
                release_conn(state, state.orphans.popleft())
        if checklive:
            sock = rq.environ.get("gunicorn.socket")
            if type(sock) is not socket.socket:
                sock = None
            elif not state.pool._pool and socket_gone(sock):  # none idle: a wait may come
                raise ClientGone()
        if hist:
            requested = monotonic()
        conn = state.pool.getconn()
        if checklive and (gone := _both_polled(sock, conn, socket_gone, server_gone)):
            if gone & 1:
                state.pool.putconn(conn)  # no statement ran on it
                raise ClientGone()
            conn = fresh(state, conn)
        if live and server_gone(conn):
            conn = fresh(state, conn)
        if livepoll and _server_gone_polled(conn, pg_poll, server_gone):
            conn = fresh(state, conn)
        if hist or hold:
            now = monotonic()
            conn.bench_at = now
        if lazy:
            waits = state.waits
            waits.append(now - requested)
            if len(waits) >= _FOLD_EVERY:
                state.fold()
        elif hist:
            state.wait_time.observe(now - requested)
        if count:
            state.checkouts += 1
        if owner:
            current = _FloorOwner()
            current_owner.set(current)
            own(conn, current)
        if hold:
            conn.bench_hold = state.watcher.add(conn, now)  # type: ignore[union-attr]
        held = _FloorLease(conn, state.orphans) if lease else conn
        setattr(rq, FLOOR_ATTR, held)
        if guard:
            rq.environ[FLOOR_HELD] = held

    def after(state: _FloorState, response: Any) -> Any:
        if guard and response.is_streamed:
            environ = request.environ
            environ[FLOOR_STREAM] = environ.pop(FLOOR_HELD, None)
        return response

    def teardown(state: _FloorState, exc: BaseException | None = None) -> None:
        rq = request._get_current_object()  # type: ignore[attr-defined]
        held = rq.environ.pop(FLOOR_HELD, None) if guard else rq.__dict__.pop(FLOOR_ATTR, None)
        if held is not None:
            release(state, held)

    def release(state: _FloorState, held: Any) -> None:
        if lease:
            held = held.take()
            if held is None:
                return
        release_conn(state, held)

    def release_conn(state: _FloorState, conn: Any) -> None:
        if owner:
            own(conn, _HANDED_BACK)
        if hold:
            state.watcher.remove(conn.bench_hold)  # type: ignore[union-attr]
        pgconn = conn.pgconn
        text = sql.get(pgconn.transaction_status)
        if text is not None:
            with conn.lock:
                pgconn.exec_(text)
            if pgconn.transaction_status != idle:  # the write check failed: it wrote
                with conn.lock:
                    pgconn.exec_(failed_sql)
                conn._prepared.clear()  # as psycopg does when it sees a ROLLBACK
        if lazy:
            state.holds.append(monotonic() - conn.bench_at)
        elif hist:
            state.hold_time.observe(monotonic() - conn.bench_at)
        state.pool.putconn(conn)
        if count:
            state.releases += 1

    app.before_request(functools.partial(before, state))
    app.after_request(functools.partial(after, state))
    app.teardown_request(functools.partial(teardown, state))
    if guard:
        app.wsgi_app = _FloorGuard(app.wsgi_app, functools.partial(release, state))  # type: ignore[method-assign]
    else:
        app.wsgi_app = _PassThrough(app.wsgi_app)  # type: ignore[method-assign]

    if lease:

        def get_conn() -> Any:
            return getattr(request._get_current_object(), FLOOR_ATTR).conn  # type: ignore[attr-defined]

    else:

        def get_conn() -> Any:
            return getattr(request._get_current_object(), FLOOR_ATTR)  # type: ignore[attr-defined]

    @app.get("/select1")
    def select1() -> str:
        row = get_conn().execute(SELECT1_SQL).fetchone()
        return str(row[0]) if row else ""

    @app.get("/read")
    def read() -> Response:
        row = get_conn().execute(READ_SQL, (random_sku(),)).fetchone()
        return jsonify(_row_json(row))


def _reqconn(
    app: Flask,
    variant: str,
    dsn: str,
    appname: str,
    pool_size: int,
    random_sku: Any,
    extra: dict[str, Any],
) -> None:
    """(b) and (c), with *extra* config: flask-reqconn with ``get_conn()``."""
    from flask_reqconn import ReqConn, get_conn

    app.config.update(
        REQCONN_CONNINFO=dsn,
        REQCONN_MIN_SIZE=pool_size,
        REQCONN_MAX_SIZE=pool_size,
        REQCONN_CHECKOUT=variant,
        REQCONN_CONNECT_ARGS={
            "application_name": appname,
            **extra.pop("REQCONN_CONNECT_ARGS", {}),
        },
    )
    metrics = extra.pop("BENCH_METRICS", False)
    app.config.update(extra)
    reqconn = ReqConn(app)
    app.extensions["bench_reqconn"] = reqconn
    if metrics:
        from prometheus_client import CollectorRegistry

        from flask_reqconn.integrations.prometheus import PrometheusMetrics

        PrometheusMetrics(CollectorRegistry()).init_app(app)

    @app.get("/select1")
    def select1() -> str:
        row = get_conn().execute(SELECT1_SQL).fetchone()
        return str(row[0]) if row else ""

    @app.get("/read")
    def read() -> Response:
        row = get_conn().execute(READ_SQL, (random_sku(),)).fetchone()
        return jsonify(_row_json(row))

    @app.get("/stream")
    def stream() -> Response:
        conn = get_conn()

        def body() -> Iterator[str]:
            for _ in range(5):
                row = conn.execute(READ_SQL, (random_sku(),)).fetchone()
                yield f"{row[1] if row else '-'}\n"

        return Response(stream_with_context(body()), mimetype="text/plain")

    @app.post("/upload")
    def upload() -> str:
        size = len(request.get_data())
        row = get_conn().execute(UPLOAD_SQL, (size,)).fetchone()
        return str(row[0]) if row else ""

    @app.get("/stats")
    @reqconn.exempt
    def stats() -> Response:
        return jsonify(reqconn.stats())


def _fsqla(
    app: Flask,
    dsn: str,
    appname: str,
    pool_size: int,
    random_sku: Any,
    *,
    reqconn: bool = False,
    engine_options: dict[str, Any] | None = None,
) -> None:
    """(d): Flask-SQLAlchemy 3.1, psycopg 3 driver, the same SQL as ``text()``, and an
    ORM model of the same table for ``/orm`` and ``/ormwrite``.

    With *reqconn*, the same app on flask-reqconn's pool (eager checkout, ``/nodb`` and
    ``/stats`` exempt), configured as the SQLAlchemy docs page says. *engine_options*
    (``fsqla`` only, :data:`FSQLA_SWITCHES`) are added to the ``QueuePool``'s.
    """
    from flask_sqlalchemy import SQLAlchemy
    from psycopg.conninfo import conninfo_to_dict
    from sqlalchemy import URL, text

    if reqconn:
        from flask_reqconn import ReqConn
        from flask_reqconn.integrations.sqlalchemy import engine_options

        app.config.update(
            REQCONN_CONNINFO=dsn,
            REQCONN_MIN_SIZE=pool_size,
            REQCONN_MAX_SIZE=pool_size,
            REQCONN_CONNECT_ARGS={"application_name": appname},
            REQCONN_EXEMPT_ENDPOINTS=["nodb", "stats"],
            SQLALCHEMY_DATABASE_URI="postgresql+psycopg://",
            SQLALCHEMY_ENGINE_OPTIONS=engine_options(),
        )
        ext = ReqConn(app)

        @app.get("/stats")
        def stats() -> Response:
            return jsonify(ext.stats())

    else:
        params = conninfo_to_dict(dsn)
        query = {k: str(v) for k, v in params.items() if k not in ("user", "password", "dbname")}
        host = query.pop("host", None)
        port = query.pop("port", None)
        url = URL.create(
            "postgresql+psycopg",
            username=params.get("user"),
            password=params.get("password"),
            database=params.get("dbname"),
            query={**query, **({"host": host} if host else {}), **({"port": port} if port else {})},
        )
        app.config.update(
            SQLALCHEMY_DATABASE_URI=url,
            SQLALCHEMY_ENGINE_OPTIONS={
                "pool_size": pool_size,
                "max_overflow": 0,
                "pool_timeout": 5,
                "connect_args": {"application_name": appname},
                **(engine_options or {}),
            },
        )
    db = SQLAlchemy(app)
    select1_sql = text(SELECT1_SQL)
    read_sql = text(READ_SQL_SQLA)

    class Item(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "bench_items"
        # Column() style: benchapp.py's postponed annotations would hide Mapped[] from
        # SQLAlchemy inside a function
        id = db.Column(db.Integer, primary_key=True)
        sku = db.Column(db.String, unique=True, nullable=False)
        name = db.Column(db.String, nullable=False)
        price_cents = db.Column(db.Integer, nullable=False)

        def to_dict(self) -> dict[str, Any]:
            return {
                "id": self.id, "sku": self.sku, "name": self.name,
                "price_cents": self.price_cents,
            }  # fmt: skip

    rows = int(os.environ.get("BENCH_ROWS", "100000"))

    @app.get("/orm")
    def orm() -> Response:
        item = db.session.execute(db.select(Item).filter_by(sku=random_sku())).scalar_one()
        return jsonify(item.to_dict())

    @app.get("/ormpage")
    def ormpage() -> Response:
        first = random.randint(1, max(1, rows - 50))
        query = (
            db.select(Item)
            .where(Item.sku.between(sku_of(first), sku_of(first + 49)))
            .order_by(Item.sku)
        )
        page = db.paginate(query, page=1, per_page=20, error_out=False)
        return jsonify(total=page.total, items=[item.to_dict() for item in page.items])

    @app.get("/ormwrite")
    def ormwrite() -> Response:
        item = db.session.execute(db.select(Item).filter_by(sku=random_sku())).scalar_one()
        item.price_cents = (item.price_cents + 1) % 100_000
        db.session.commit()
        return jsonify(item.to_dict())

    @app.get("/select1")
    def select1() -> str:
        return str(db.session.execute(select1_sql).scalar())

    @app.get("/read")
    def read() -> Response:
        row = db.session.execute(read_sql, {"sku": random_sku()}).first()
        return jsonify(_row_json(row))
