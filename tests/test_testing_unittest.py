"""flask_reqconn.testing for unittest suites: ReqConnTestCase, postgres_dsn, close_app.

Each test writes a small app and a real ``unittest`` suite into a temporary directory and
runs it with ``python -m unittest`` in a subprocess, as a user's suite runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psycopg
import pytest

from flask_reqconn import testing
from tests import pg
from tests.servers import REPO_ROOT

#: A Flask-SQLAlchemy app on flask-reqconn, as the SQLAlchemy page sets one up.
APP = '''
from flask import Flask, Response, stream_with_context
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import String, select
from sqlalchemy.orm import Mapped, mapped_column

from flask_reqconn import ReqConn, testing
from flask_reqconn.integrations.sqlalchemy import engine_options

db = SQLAlchemy()
reqconn = ReqConn()


class Note(db.Model):
    __tablename__ = "{table}"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String)


def create_app(dsn):
    app = Flask("{appname}")
    app.config.update(
        REQCONN_CONNINFO=testing.with_conninfo(dsn, application_name="{appname}"),
        REQCONN_MAX_SIZE=2,
        SQLALCHEMY_DATABASE_URI="postgresql+psycopg://",
        SQLALCHEMY_ENGINE_OPTIONS=engine_options(),
    )
    reqconn.init_app(app)
    db.init_app(app)

    @app.get("/notes")
    def notes():
        return [n.text for n in db.session.scalars(select(Note).order_by(Note.id))]

    @app.post("/notes/<text>")
    def add(text):
        db.session.add(Note(text=text))
        db.session.commit()
        return "", 201

    @app.get("/stream")
    def stream():
        def rows():
            for note in db.session.scalars(select(Note)):
                yield note.text
        return Response(stream_with_context(rows()))

    return app
'''

#: The suite: setUp pushes an application context (Flask-SQLAlchemy's own tests' style).
SUITE = '''
import unittest

from flask_reqconn import testing
from myapp import Note, create_app, db


class NotesTest(testing.ReqConnTestCase):
    reqconn_strict = True

    def setUp(self):
        super().setUp()
        self.app = self.close_after(create_app(self.pg_dsn))
        self.push_app_context(self.app)
        db.create_all()
        self.addCleanup(db.drop_all)
        self.client = self.app.test_client()

    def test_get_twice(self):
        self.assertEqual(self.client.get("/notes").status_code, 200)
        self.assertEqual(self.client.get("/notes").status_code, 200)

    def test_add_then_list(self):
        self.assertEqual(self.client.post("/notes/hello").status_code, 201)
        db.session.add(Note(text="from the test"))
        db.session.commit()
        self.assertEqual(self.client.get("/notes").json, ["hello", "from the test"])
        self.assertNoCheckouts(self.app)


class OwnBaseClass(unittest.TestCase):
    """A suite with a base class of its own uses the functions."""

    @classmethod
    def setUpClass(cls):
        cls.dsn = testing.postgres_dsn()

    def setUp(self):
        self.app = create_app(self.dsn)
        self.ctx = self.app.app_context()
        self.ctx.push()
        db.create_all()
        self.client = self.app.test_client()

    def tearDown(self):
        db.drop_all()
        self.ctx.pop()
        testing.close_app(self.app)

    def test_get_twice(self):
        self.assertEqual(self.client.get("/notes").status_code, 200)
        self.assertEqual(self.client.get("/notes").status_code, 200)
'''

#: A test that leaves a streamed response unread: its connection is still out.
LEAKING_SUITE = '''
from flask_reqconn import testing
from myapp import create_app, db


class LeakTest(testing.ReqConnTestCase):
    def setUp(self):
        super().setUp()
        self.app = self.close_after(create_app(self.pg_dsn))
        with self.app.app_context():
            db.create_all()
        self.client = self.app.test_client()

    def test_leaves_a_stream_unread(self):
        self.response = self.client.get("/stream")  # never read, never closed
'''


def run_unittest(
    tmp_path: Path, suite: str, table: str, appname: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "myapp.py").write_text(APP.format(table=table, appname=appname))
    (tmp_path / "test_notes.py").write_text(textwrap.dedent(suite))
    return subprocess.run(
        [sys.executable, "-m", "unittest", "-v", "test_notes"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO_ROOT}", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_unittest_suite_with_a_pushed_app_context_passes_and_closes_its_pools(
    tmp_path: Path, pg_dsn: str, pg_admin: psycopg.Connection[Any]
) -> None:
    appname = pg.unique_name("ut")
    done = run_unittest(
        tmp_path, SUITE, pg.unique_name("notes"), appname, {testing.DSN_ENV: pg_dsn}
    )
    assert done.returncode == 0, done.stderr
    assert "Ran 3 tests" in done.stderr and "OK" in done.stderr, done.stderr
    assert testing.app_sessions(pg_admin, appname) == []  # every pool closed


def test_a_connection_left_out_fails_the_test_that_left_it(
    tmp_path: Path, pg_dsn: str
) -> None:
    done = run_unittest(
        tmp_path,
        LEAKING_SUITE,
        pg.unique_name("notes"),
        pg.unique_name("ut"),
        {testing.DSN_ENV: pg_dsn},
    )
    assert done.returncode == 1, done.stderr
    assert "test_leaves_a_stream_unread" in done.stderr
    assert "still checked out" in done.stderr and "GET /stream" in done.stderr, done.stderr


@pytest.mark.slow
def test_postgres_dsn_starts_a_throwaway_server_once_and_stops_it_at_exit(
    tmp_path: Path,
) -> None:
    script = textwrap.dedent(
        """
        import psycopg
        from flask_reqconn import testing
        dsn = testing.postgres_dsn()
        assert testing.postgres_dsn() == dsn
        with psycopg.connect(dsn) as conn:
            print(conn.execute("SHOW data_directory").fetchone()[0])
        """
    )
    env = {k: v for k, v in os.environ.items() if k != testing.DSN_ENV}
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    data_directory = Path(done.stdout.strip().splitlines()[-1])
    assert data_directory.name == "pg"
    assert not data_directory.exists()  # stopped and removed at exit
