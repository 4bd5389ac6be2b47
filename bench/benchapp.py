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

import os
import random
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, jsonify, request, stream_with_context

SELECT1_SQL = "SELECT 1"
UPLOAD_SQL = "SELECT %s::int"
READ_SQL = "SELECT id, sku, name, price_cents FROM bench_items WHERE sku = %s"
READ_SQL_SQLA = "SELECT id, sku, name, price_cents FROM bench_items WHERE sku = :sku"
APPLICATION_NAME_PREFIX = "bench_"

VARIANTS = ("bare", "eager", "lazy", "fsqla", "plain", "fsqlarc", "plainshape", "bareshape")
#: Suffixes for ``eager`` and ``lazy`` that switch one feature off each, combinable
#: (``eager-noreset-nocheck``): what each safety feature costs.
FEATURE_SWITCHES: dict[str, dict[str, Any]] = {
    "noreset": {"REQCONN_RESET_SESSION": False},
    "nocheck": {"REQCONN_CHECK_CLIENT": False},
    "nocancel": {"REQCONN_CANCEL_ON_DISCONNECT": "off"},
    "noprep": {"REQCONN_CONNECT_ARGS": {"prepare_threshold": None}},
    "leak": {"REQCONN_LEAK_THRESHOLD": 30},
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


def parse_variant(variant: str) -> tuple[str, dict[str, Any]]:
    """``"eager-noreset-nocheck"`` -> ``("eager", {REQCONN_* overrides})``."""
    base, *switches = variant.split("-")
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
    app.config.update(extra)
    reqconn = ReqConn(app)
    app.extensions["bench_reqconn"] = reqconn

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
            query={
                **query, **({"host": host} if host else {}), **({"port": port} if port else {})
            },
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
