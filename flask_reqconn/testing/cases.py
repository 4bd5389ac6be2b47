"""A ``unittest.TestCase`` base class for apps on flask-reqconn.

The pytest plugin's fixtures do not reach ``unittest`` suites; this gives them the same
things as methods and class attributes. Suites with a base class of their own use the
functions it is made of: :func:`~flask_reqconn.testing.postgres_dsn`,
:func:`~flask_reqconn.testing.close_app`, :func:`~flask_reqconn.testing.assert_no_checkouts`
and :func:`~flask_reqconn.testing.strict`.
"""

from __future__ import annotations

import typing as t
import unittest

from flask import Flask
from flask.ctx import AppContext

from .checks import assert_no_checkouts, close_app
from .postgres import postgres_dsn
from .strict import strict

__all__ = ["ReqConnTestCase"]


class ReqConnTestCase(unittest.TestCase):
    """Base class for ``unittest`` suites of an app on flask-reqconn.

    * :attr:`pg_dsn`: the test PostgreSQL (``$REQCONN_TEST_DSN``, else a throwaway server
      for the whole run), set by ``setUpClass``;
    * :meth:`close_after`: the app's pools closed after the test, once nothing is
      checked out;
    * :meth:`push_app_context`: an application context for the test, popped after it;
    * :meth:`assertNoCheckouts`;
    * :attr:`reqconn_strict`: :ref:`strict mode <strict-mode>` for every test.

    A subclass that overrides ``setUpClass`` or ``setUp`` calls ``super()``'s first.

    .. versionadded:: 0.1
    """

    #: The conninfo of the test PostgreSQL (see :func:`~flask_reqconn.testing.postgres_dsn`).
    pg_dsn: t.ClassVar[str]
    #: Strict mode for each test of the class.
    reqconn_strict: t.ClassVar[bool] = False

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.pg_dsn = postgres_dsn()

    def setUp(self) -> None:
        super().setUp()
        if self.reqconn_strict:
            self.enter(strict())

    def enter(self, cm: t.ContextManager[t.Any]) -> t.Any:
        """Enter *cm* now and exit it after the test (``enterContext`` of Python 3.11)."""
        value = cm.__enter__()
        self.addCleanup(cm.__exit__, None, None, None)
        return value

    def close_after(self, app: Flask, *, check: bool = True) -> Flask:
        """Close *app*'s pools after the test (:func:`~flask_reqconn.testing.close_app`).

        With *check*, the test fails if a connection of *app* is still checked out then
        (after the cleanups registered later, such as :meth:`push_app_context`'s, ran).
        Returns *app*: ``self.app = self.close_after(create_app(...))``.
        """
        self.addCleanup(close_app, app, check=check)
        return app

    def push_app_context(self, app: Flask) -> AppContext:
        """Push an application context of *app* for the rest of the test.

        The test client reuses it for every request; sessions of Flask-SQLAlchemy and
        Flask-SQLAlchemy-Lite on flask-reqconn start over at each request.
        """
        ctx = app.app_context()
        ctx.push()
        self.addCleanup(ctx.pop)
        return ctx

    def assertNoCheckouts(self, app: Flask) -> None:  # noqa: N802 - unittest's style
        """:func:`~flask_reqconn.testing.assert_no_checkouts`."""
        assert_no_checkouts(app)
