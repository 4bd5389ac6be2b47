"""The blog: list, create, update, delete posts."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, flash, g, redirect, render_template, request, url_for
from werkzeug.exceptions import abort
from werkzeug.wrappers import Response

from flask_reqconn import get_conn

from .auth import login_required

bp = Blueprint("blog", __name__)


@bp.route("/")
def index() -> str:
    posts = get_conn().execute(
        'SELECT p.id, title, body, created, author_id, username'
        ' FROM post p JOIN "user" u ON p.author_id = u.id'
        " ORDER BY created DESC, p.id DESC"
    ).fetchall()
    return render_template("blog/index.html", posts=posts)


def get_post(id: int, check_author: bool = True) -> dict[str, Any]:
    post: dict[str, Any] | None = get_conn().execute(
        "SELECT p.id, title, body, created, author_id, username"
        ' FROM post p JOIN "user" u ON p.author_id = u.id'
        " WHERE p.id = %s",
        (id,),
    ).fetchone()
    if post is None:
        abort(404, f"Post id {id} doesn't exist.")
    if check_author and post["author_id"] != g.user["id"]:
        abort(403)
    return post


@bp.route("/create", methods=("GET", "POST"))
@login_required
def create() -> str | Response:
    if request.method == "POST":
        title = request.form["title"]
        body = request.form["body"]
        if not title:
            flash("Title is required.")
        else:
            conn = get_conn()
            conn.execute(
                "INSERT INTO post (title, body, author_id) VALUES (%s, %s, %s)",
                (title, body, g.user["id"]),
            )
            conn.commit()
            return redirect(url_for("blog.index"))
    return render_template("blog/create.html")


@bp.route("/<int:id>/update", methods=("GET", "POST"))
@login_required
def update(id: int) -> str | Response:
    post = get_post(id)
    if request.method == "POST":
        title = request.form["title"]
        body = request.form["body"]
        if not title:
            flash("Title is required.")
        else:
            conn = get_conn()
            conn.execute("UPDATE post SET title = %s, body = %s WHERE id = %s", (title, body, id))
            conn.commit()
            return redirect(url_for("blog.index"))
    return render_template("blog/update.html", post=post)


@bp.route("/<int:id>/delete", methods=("POST",))
@login_required
def delete(id: int) -> Response:
    get_post(id)
    conn = get_conn()
    conn.execute("DELETE FROM post WHERE id = %s", (id,))
    conn.commit()
    return redirect(url_for("blog.index"))
