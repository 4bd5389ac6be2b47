"""More real servers for end-to-end tests: nginx in front, uWSGI, Granian.

Built on :mod:`tests.servers` (``ServerProcess``, ``free_port``): every server runs in
its own session on free loopback ports, logs to a file, and is stopped by PID. The nginx
configs are the snippets under ``docs/snippets/`` that the deployment docs include, with
only the listen address and the upstream address replaced, so the docs show what is
tested.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

from tests.servers import REPO_ROOT, ServerError, ServerProcess, free_port

SNIPPETS = REPO_ROOT / "docs" / "snippets"
#: The addresses the snippets use, replaced by a test's own.
SNIPPET_LISTEN = "listen 80;"
SNIPPET_UPSTREAM = "server 127.0.0.1:8000;"

NGINX_ENV = "REQCONN_NGINX"
NGINX_HOW = (
    "install Debian's nginx (apt-get install nginx; scripts/dev.py test does it as root)"
    f" or set {NGINX_ENV} to the binary's path"
)


def find_nginx() -> str:
    """Path of the nginx binary: ``$REQCONN_NGINX``, PATH, then /usr/sbin.

    Not installed: the test is skipped, saying how to install it (plain ``pytest``). A binary
    named by ``$REQCONN_NGINX`` must be there: ``scripts/dev.py test`` names the one it found
    or installed, so a full run never skips.
    """
    explicit = os.environ.get(NGINX_ENV)
    candidates = [explicit] if explicit else [shutil.which("nginx"), "/usr/sbin/nginx"]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    if explicit:
        raise ServerError(f"${NGINX_ENV}={explicit} is not an executable: {NGINX_HOW}")
    pytest.skip(f"nginx is not installed: {NGINX_HOW}")


def nginx_snippet(name: str, *, listen_port: int, upstream: str) -> str:
    """``docs/snippets/<name>.conf`` with the test's listen port and upstream address."""
    text = (SNIPPETS / f"{name}.conf").read_text()
    for old, new in (
        (SNIPPET_LISTEN, f"listen 127.0.0.1:{listen_port};"),
        (SNIPPET_UPSTREAM, f"server {upstream};"),
    ):
        if text.count(old) != 1:
            raise ServerError(f"snippet {name}.conf must contain {old!r} exactly once")
        text = text.replace(old, new)
    return text


# nginx runs in the foreground as its own master (so it is stopped by PID), writes its
# error log to stderr and its access log to a file, and keeps everything in the tmp dir.
_NGINX_MAIN = """\
daemon off;
{user}worker_processes 1;
pid {prefix}/nginx.pid;
error_log stderr info;

events {{
    worker_connections 512;
}}

http {{
    log_format reqconn '$status $request_method $request_uri upstream=$upstream_status';
    access_log {prefix}/access.log reqconn;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

    include {snippet};
}}
"""


class NginxProcess(ServerProcess):
    """An nginx master and its worker; ``access_log`` has one ``status method uri`` a line."""

    access_log: Path

    def statuses(self, path_prefix: str = "/") -> list[int]:
        """Statuses in the access log of requests whose URI starts with ``path_prefix``."""
        try:
            lines = self.access_log.read_text().splitlines()
        except FileNotFoundError:
            return []
        found = []
        for line in lines:
            status, _method, uri, *_ = line.split(" ")
            if uri.startswith(path_prefix):
                found.append(int(status))
        return found


def nginx(
    snippet: str,
    *,
    upstream_port: int,
    log_dir: str | os.PathLike[str] | None = None,
    env: Mapping[str, str | None] | None = None,
    start: bool = True,
) -> NginxProcess:
    """nginx (Debian's package) with ``docs/snippets/<snippet>.conf``, on a free port.

    ``upstream_port`` is the app server's port on 127.0.0.1.
    """
    binary = find_nginx()
    port = free_port()
    log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="srv-"))
    prefix = log_dir / f"nginx-{port}"
    prefix.mkdir()
    shutil.copy("/etc/nginx/uwsgi_params", prefix / "uwsgi_params")  # for uwsgi_pass
    conf_snippet = prefix / f"{snippet}.conf"
    conf_snippet.write_text(
        nginx_snippet(snippet, listen_port=port, upstream=f"127.0.0.1:{upstream_port}")
    )
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(_NGINX_MAIN.format(user=user, prefix=prefix, snippet=conf_snippet))
    cmd = [binary, "-p", str(prefix), "-c", str(conf), "-e", "stderr"]
    server = NginxProcess(
        cmd, port, env=env, log_dir=log_dir, name=f"nginx-{snippet}", min_workers=1
    )
    server.access_log = prefix / "access.log"
    return server.start() if start else server  # type: ignore[return-value]


# --------------------------------------------------------------------------------------
# uWSGI (the pyuwsgi wheel's ``uwsgi`` command, next to this Python)
# --------------------------------------------------------------------------------------


def find_uwsgi() -> str:
    here = Path(sys.executable).parent / "uwsgi"
    found = str(here) if os.access(here, os.X_OK) else shutil.which("uwsgi")
    if not found:
        raise ServerError("uwsgi not found: pip install pyuwsgi (the test extra has it)")
    return found


def _uwsgi_ready(server: ServerProcess) -> bool:
    log = server.log_text()
    if "no python application found" in log:
        raise ServerError(f"uWSGI could not load the app\n{server.log_tail()}")
    apps = log.count("WSGI app 0 (mountpoint='') ready")
    workers = len(re.findall(r"spawned uWSGI worker \d+", log))
    want_apps = server.min_workers if "--lazy-apps" in server.cmd else 1
    return apps >= want_apps and workers >= server.min_workers


def uwsgi(
    app_spec: str,
    *,
    protocol: str = "http",
    processes: int = 1,
    threads: int = 1,
    lazy_apps: bool = False,
    enable_threads: bool = True,
    extra_args: Iterable[str] = (),
    env: Mapping[str, str | None] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    start: bool = True,
) -> ServerProcess:
    """uWSGI with a master, on a free port; ``app_spec`` is ``module:callable``.

    ``protocol``: ``"http"`` (``--http-socket``, clients connect directly) or ``"uwsgi"``
    (``--uwsgi-socket``, for nginx's ``uwsgi_pass``). A callable named ``create_*`` is
    called (``--module 'mod:create_app()'``). ``--die-on-term`` makes SIGTERM stop it
    (uWSGI 2.0 reloads on SIGTERM otherwise); ``--need-app`` makes a broken app fatal.
    """
    port = free_port()
    module, _, attr = app_spec.partition(":")
    if attr.startswith("create_") and not attr.endswith(")"):
        attr += "()"
    if protocol not in ("http", "uwsgi"):
        raise ValueError(f"protocol must be 'http' or 'uwsgi', not {protocol!r}")
    cmd = [
        find_uwsgi(),
        f"--{protocol}-socket", f"127.0.0.1:{port}",
        "--module", f"{module}:{attr}",
        "--master", "--processes", str(processes),
        "--die-on-term", "--need-app", "--vacuum",
    ]  # fmt: skip
    if threads > 1:
        cmd += ["--threads", str(threads)]
    if enable_threads:
        cmd.append("--enable-threads")
    if lazy_apps:
        cmd.append("--lazy-apps")
    cmd += list(extra_args)
    server = ServerProcess(
        cmd, port, env=env, cwd=cwd, log_dir=log_dir, name=f"uwsgi-{protocol}",
        min_workers=processes, ready=_uwsgi_ready,
    )  # fmt: skip
    return server.start() if start else server


# --------------------------------------------------------------------------------------
# Granian (its WSGI interface)
# --------------------------------------------------------------------------------------


def find_granian() -> str:
    here = Path(sys.executable).parent / "granian"
    found = str(here) if os.access(here, os.X_OK) else shutil.which("granian")
    if not found:
        raise ServerError("granian not found: pip install granian (the test extra has it)")
    return found


def granian(
    app_spec: str,
    *,
    workers: int = 1,
    blocking_threads: int = 4,
    extra_args: Iterable[str] = (),
    env: Mapping[str, str | None] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    start: bool = True,
) -> ServerProcess:
    """``granian --interface wsgi`` on a free port; a ``create_*`` target is a factory."""
    port = free_port()
    factory = app_spec.rpartition(":")[2].startswith("create_")
    cmd = [
        find_granian(), "--interface", "wsgi",
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", str(workers), "--blocking-threads", str(blocking_threads),
        "--no-ws", "--access-log",
        *(["--factory"] if factory else []),
        *extra_args, app_spec,
    ]  # fmt: skip

    def ready(server: ServerProcess) -> bool:
        return server.log_text().count("Started worker-") >= workers

    server = ServerProcess(
        cmd, port, env=env, cwd=cwd, log_dir=log_dir, name="granian",
        min_workers=workers, ready=ready,
    )  # fmt: skip
    return server.start() if start else server


# --------------------------------------------------------------------------------------
# Reading the servers' logs
# --------------------------------------------------------------------------------------

#: Lines that mean an error a person must look at, per server family. An aborted client
#: may leave INFO lines (nginx's 499s, gunicorn's DEBUG write errors), never these.
LOUD = (
    "Traceback (most recent call last)",
    "[ERROR]",  # gunicorn, Granian
    "Error handling request",  # gunicorn
    "Error on request",  # the werkzeug dev server
    "Exception while serving",  # waitress
    "ERROR in app",  # Flask's logger (an unhandled exception)
    "Unknown Error",  # a ClientGone that reached the server
    "[error]", "[crit]", "[alert]", "[emerg]",  # nginx
    "OSError: write error",  # uWSGI's write exception
)  # fmt: skip


def loud_lines(server: ServerProcess) -> list[str]:
    """The lines of ``server``'s log that say an error happened (``[]``: quiet)."""
    return [line for line in server.log_text().splitlines() if any(m in line for m in LOUD)]


__all__ = [
    "LOUD",
    "NginxProcess",
    "SNIPPETS",
    "find_nginx",
    "granian",
    "loud_lines",
    "nginx",
    "nginx_snippet",
    "uwsgi",
]
