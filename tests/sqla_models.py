"""ORM models and a table of their own for the SQLAlchemy integration tests.

The table name is unique per test session, so tests can share a PostgreSQL with others.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tests import pg

TABLE = pg.unique_name("sqla_items")


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = TABLE

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String, unique=True)


CREATE_SQL = sql.SQL("CREATE TABLE {} (id serial PRIMARY KEY, name text UNIQUE NOT NULL)")


@pytest.fixture(scope="module")
def items_table(pg_admin: psycopg.Connection[Any]) -> Iterator[str]:
    """The items table, created once per module and dropped after it."""
    pg_admin.execute(CREATE_SQL.format(sql.Identifier(TABLE)))
    try:
        yield TABLE
    finally:
        pg_admin.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(TABLE)))


@pytest.fixture
def items(items_table: str, pg_admin: psycopg.Connection[Any]) -> Iterator[str]:
    """The items table, emptied for this test."""
    pg_admin.execute(sql.SQL("TRUNCATE {} RESTART IDENTITY").format(sql.Identifier(TABLE)))
    yield items_table


def names(admin: psycopg.Connection[Any]) -> list[str]:
    """The committed item names, as another session sees them."""
    rows = admin.execute(
        sql.SQL("SELECT name FROM {} ORDER BY id").format(sql.Identifier(TABLE))
    ).fetchall()
    return [row[0] for row in rows]
