"""Register, log in, log out."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from flask import Blueprint, flash, g, redirect, render_template, request, session, url_for
from werkzeug.security import check_password_hash, generate_password_hash
from werkzeug.wrappers import Response

from flask_reqconn import get_conn

bp = Blueprint("auth", __name__, url_prefix="/auth")

F = TypeVar("F", bound=Callable[..., Any])


def login_required(view: F) -> F:
    """Redirect anonymous users to the login page."""

    @functools.wraps(view)
    def wrapped_view(**kwargs: Any) -> Any:
        if g.user is None:
            return redirect(url_for("auth.login"))
        return view(**kwargs)

    return wrapped_view  # type: ignore[return-value]


@bp.before_app_request
def load_logged_in_user() -> None:
    user_id = session.get("user_id")
    if user_id is None:
        g.user = None
    else:
        g.user = get_conn().execute('SELECT * FROM "user" WHERE id = %s', (user_id,)).fetchone()


@bp.route("/register", methods=("GET", "POST"))
def register() -> str | Response:
    if request.method == "POST":
        username = request.form["username"]
        password = request.form["password"]
        conn = get_conn()
        error = None
        if not username:
            error = "Username is required."
        elif not password:
            error = "Password is required."
        if error is None:
            try:
                conn.execute(
                    'INSERT INTO "user" (username, password) VALUES (%s, %s)',
                    (username, generate_password_hash(password)),
                )
                conn.commit()
            except psycopg.errors.UniqueViolation:
                # PostgreSQL raises at execute() and aborts the transaction: roll back
                # before the connection runs anything else in this request
                conn.rollback()
                error = f"User {username} is already registered."
            else:
                return redirect(url_for("auth.login"))
        flash(error)
    return render_template("auth/register.html")


@bp.route("/login", methods=("GET", "POST"))
def login() -> str | Response:
    if request.method == "POST":
        username = request.form["username"]
        password = request.form["password"]
        user = get_conn().execute(
            'SELECT * FROM "user" WHERE username = %s', (username,)
        ).fetchone()
        error = None
        if user is None:
            error = "Incorrect username."
        elif not check_password_hash(user["password"], password):
            error = "Incorrect password."
        if error is None and user is not None:
            session.clear()
            session["user_id"] = user["id"]
            return redirect(url_for("index"))
        flash(error or "Incorrect username.")
    return render_template("auth/login.html")


@bp.route("/logout")
def logout() -> Response:
    session.clear()
    return redirect(url_for("index"))
