#!/usr/bin/env python3
"""The project's two commands, needing nothing but Python 3.10+:

    python3 scripts/dev.py test [PYTEST ARGS...]   lint, type-check, docs, pytest, pytest
                                                   again over TCP, the example app's suite
                                                   (examples/flaskr), then the built
                                                   package (sdist + wheel)
    python3 scripts/dev.py test --fast [ARGS...]   lint, type-check and the tests not marked
                                                   slow (pytest -m "not slow"): no servers,
                                                   no docs, no TCP pass, no package
    python3 scripts/dev.py demo [DEMO ARGS...]     run examples/demo.py

Both first make sure ``.venv`` in the repository exists and has the project installed
editable with its ``dev`` extra (``pip install -e '.[dev]'``). The install is redone only
when pyproject.toml (or this script's install recipe) changed, or the venv is broken.

Set ``REQCONN_TEST_DSN`` to test against an existing PostgreSQL instead of a throwaway one.
After the main run, the PostgreSQL-facing tests that are not slow, and the slow ones marked
``tcp`` (gunicorn with clients that leave), run a second time with ``--pg-tcp``: the
throwaway server is then reached on 127.0.0.1 instead of its unix socket, so the conninfo
paths only TCP takes (``REQCONN_TCP_DEFAULTS``, ``connect_timeout``, keepalives) are
exercised. With ``REQCONN_TEST_DSN`` (or ``--test-dsn``) that pass is skipped: the conninfo
given decides the transport.
The package step builds the sdist and the wheel, checks them (``twine check``, the wheel's
files), installs the wheel into a fresh venv and runs the example app's suite from a copy
outside the checkout against it (PyPI, or pip's cache, is the only network it needs).
``test`` also needs the ``pgbouncer`` binary (the pgbouncer tests run it in front of the test
server): when it is missing and this runs as root on Debian/Ubuntu, it is installed with
apt-get; otherwise the test step fails and says how to install it (or set
``REQCONN_TEST_PGBOUNCER`` to its path). The same goes for ``nginx``
(``REQCONN_NGINX``). The binaries found are passed on to pytest in those variables, so that
the tests needing them, which plain ``pytest`` skips when a binary is not installed, must
run here. Standard library only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
STAMP = VENV / ".reqconn-install-stamp"
FLASKR_TESTS = ROOT / "examples" / "flaskr" / "tests"
LINT_DIRS = ("flask_reqconn", "tests", "examples", "bench", "scripts")
# Bump to force a reinstall everywhere when the recipe below changes.
RECIPE_VERSION = "1"

if sys.version_info < (3, 10):  # noqa: UP036 - this is the guard that tells the user
    sys.exit(f"dev.py needs Python 3.10 or newer, this is {sys.version.split()[0]}")


def say(msg: str) -> None:
    print(f"[dev] {msg}", flush=True)


def venv_bin(name: str) -> Path:
    return VENV / "bin" / name


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONHOME", None)
    env["VIRTUAL_ENV"] = str(VENV)
    env["PATH"] = os.pathsep.join([str(VENV / "bin"), env.get("PATH", os.defpath)])
    env["PYTHONUNBUFFERED"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    env["PIP_ROOT_USER_ACTION"] = "ignore"
    if not sys.stdout.isatty():
        env.setdefault("NO_COLOR", "1")
    return env


def run(cmd: list[str], *, check: bool = True) -> int:
    say("$ " + " ".join(cmd))
    sys.stdout.flush()
    rc = subprocess.call(cmd, cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL)
    if check and rc != 0:
        raise SystemExit(f"[dev] command failed with exit code {rc}: {' '.join(cmd)}")
    return rc


# --------------------------------------------------------------------------------------
# The virtual environment
# --------------------------------------------------------------------------------------


def install_fingerprint() -> str:
    h = hashlib.sha256()
    h.update(RECIPE_VERSION.encode())
    h.update((ROOT / "pyproject.toml").read_bytes())
    return h.hexdigest()


def venv_works() -> bool:
    python = venv_bin("python")
    if not python.exists():
        return False
    try:
        out = subprocess.run(
            [str(python), "-c", "import sys, pip; print(sys.prefix)"],
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and Path(out.stdout.strip()).resolve() == VENV.resolve()


def project_installed() -> bool:
    """The editable install is there and importable from the venv."""
    code = (
        "import importlib.metadata as m, sys; m.version('flask-reqconn');"
        "import pytest, ruff, mypy, sphinx, psycopg, psycopg_pool, gunicorn, waitress"
    )
    rc = subprocess.call(
        [str(venv_bin("python")), "-c", code],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return rc == 0


def create_venv() -> None:
    if VENV.exists():
        say(f"removing broken {VENV}")
        shutil.rmtree(VENV)
    say(f"creating {VENV} with {sys.executable} ({sys.version.split()[0]})")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, cwd=ROOT)
    except subprocess.CalledProcessError:
        shutil.rmtree(VENV, ignore_errors=True)
        sys.exit(
            "[dev] 'python3 -m venv' failed. On Debian/Ubuntu the venv module comes in a "
            "separate package: apt-get install python3-venv (or python3.X-venv), then retry."
        )


def ensure_venv() -> float:
    """Make sure .venv has the project installed; return seconds spent."""
    t0 = time.monotonic()
    fresh = False
    if not venv_works():
        create_venv()
        fresh = True
    want = install_fingerprint()
    have = STAMP.read_text().strip() if STAMP.exists() else ""
    if not fresh and have == want and project_installed():
        return 0.0
    python = str(venv_bin("python"))
    STAMP.unlink(missing_ok=True)
    run([python, "-m", "pip", "install", "--upgrade", "pip"])
    run([python, "-m", "pip", "install", "-e", ".[dev]"])
    if not project_installed():
        sys.exit("[dev] install finished but the project or its tools do not import")
    STAMP.write_text(want + "\n")
    took = time.monotonic() - t0
    say(f"environment ready in {took:.1f}s")
    return took


# --------------------------------------------------------------------------------------
# pgbouncer (Debian's package; the test fixtures run it themselves)
# --------------------------------------------------------------------------------------

PGBOUNCER_ENV = "REQCONN_TEST_PGBOUNCER"
PGBOUNCER_HOW = (
    "install it (Debian/Ubuntu: sudo apt-get install pgbouncer; macOS: brew install "
    "pgbouncer) or set REQCONN_TEST_PGBOUNCER to the binary's path, then retry"
)


def find_pgbouncer() -> str | None:
    """Path of the pgbouncer binary: $REQCONN_TEST_PGBOUNCER, PATH, then /usr/sbin."""
    explicit = os.environ.get(PGBOUNCER_ENV)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    found = shutil.which("pgbouncer")
    if found:
        return found
    for candidate in ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def pgbouncer_pids() -> set[int]:
    """PIDs of running pgbouncers using the package's config (/etc/pgbouncer/...).

    Test fixtures' pgbouncers (own configs in temp dirs) are left alone.
    """
    pids = set()
    for name in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/comm") as f:
                if f.read().strip() != "pgbouncer":
                    continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if b"/etc/pgbouncer/" in f.read():
                    pids.add(int(name))
        except OSError:
            continue
    return pids


def stop_pid(pid: int) -> bool:
    """SIGTERM, then SIGKILL, one process; True once it is gone."""
    import signal

    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                return True
            if stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] in (b"Z", b"X"):
                return True
            time.sleep(0.05)
    return False


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def apt_has_candidate(package: str) -> bool:
    out = subprocess.run(
        ["apt-cache", "policy", package], capture_output=True, text=True, check=False
    )
    for line in out.stdout.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Candidate":
            return value.strip() not in ("", "(none)")
    return False


def ensure_pgbouncer() -> tuple[bool, str]:
    """Make sure a pgbouncer binary exists; (ok, what happened)."""
    found = find_pgbouncer()
    if found:
        return True, f"found {found}"
    if os.environ.get(PGBOUNCER_ENV):
        return False, f"${PGBOUNCER_ENV}={os.environ[PGBOUNCER_ENV]} is not an executable"
    apt_get = shutil.which("apt-get")
    if not (hasattr(os, "geteuid") and os.geteuid() == 0 and apt_get):
        why = "not root" if apt_get else "no apt-get"
        return False, f"pgbouncer is not installed ({why}, so not installing it): {PGBOUNCER_HOW}"
    env = dict(child_env(), DEBIAN_FRONTEND="noninteractive")
    before = pgbouncer_pids()
    port_was_open = port_open(6432)

    def apt(args: list[str]) -> int:
        say("$ " + " ".join(args))
        return subprocess.call(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL)

    # Wait for a dpkg lock held by e.g. unattended-upgrades on a fresh machine.
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    install = [apt_get, *lock, "install", "-y", "-qq", "--no-install-recommends", "pgbouncer"]
    updated = False
    if not apt_has_candidate("pgbouncer"):
        apt([apt_get, *lock, "update", "-qq"])
        updated = True
    rc = apt(install)
    if rc != 0 and not updated:  # stale package lists (404s): refresh once and retry
        apt([apt_get, *lock, "update", "-qq"])
        rc = apt(install)
    if rc != 0:
        return False, f"apt-get install pgbouncer failed (exit {rc}): {PGBOUNCER_HOW}"
    # The package's maintainer scripts may start the pgbouncer service (no policy-rc.d, an
    # init system that honours invoke-rc.d). The tests run their own pgbouncers on free
    # ports; stop anything the install started so nothing lingers or holds port 6432.
    new = pgbouncer_pids() - before
    if new and os.path.isdir("/run/systemd/system") and shutil.which("systemctl"):
        say("stopping the pgbouncer service the package install started")
        subprocess.call(["systemctl", "stop", "pgbouncer.service"], stdin=subprocess.DEVNULL)
        new = pgbouncer_pids() - before
    for pid in sorted(new):
        say(f"stopping pgbouncer daemon {pid} started by the package install")
        if not stop_pid(pid):
            return False, f"pgbouncer daemon {pid} started by apt-get could not be stopped"
    if not port_was_open and port_open(6432):
        say("warning: something listens on 127.0.0.1:6432 after the install")
    found = find_pgbouncer()
    if not found:
        return False, f"apt-get installed pgbouncer but no binary was found: {PGBOUNCER_HOW}"
    return True, f"installed {found}"


# --------------------------------------------------------------------------------------
# nginx (Debian's package; tests/fix_servers.py runs it with configs of its own)
# --------------------------------------------------------------------------------------

NGINX_ENV = "REQCONN_NGINX"


def find_nginx() -> str | None:
    """Path of the nginx binary: $REQCONN_NGINX, PATH, then /usr/sbin."""
    explicit = os.environ.get(NGINX_ENV)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    found = shutil.which("nginx")
    return found or next(
        (c for c in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(c, os.X_OK)),
        None,
    )


def ensure_nginx() -> tuple[bool, str]:
    """Make sure an nginx binary exists (apt-get as root on Debian); (ok, what happened).

    The package's own service is never wanted: a daemon it started (one named in
    /run/nginx.pid that was not running before) is stopped by PID.
    """
    how = (
        "install it (Debian/Ubuntu: sudo apt-get install nginx; macOS: brew install"
        f" nginx) or set {NGINX_ENV} to the binary's path, then retry"
    )

    def service_pid() -> int | None:
        try:
            pid = int(Path("/run/nginx.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if os.path.exists(f"/proc/{pid}") else None

    found = find_nginx()
    if found:
        return True, f"found {found}"
    if os.environ.get(NGINX_ENV):
        return False, f"${NGINX_ENV}={os.environ[NGINX_ENV]} is not an executable"
    apt_get = shutil.which("apt-get")
    if not (hasattr(os, "geteuid") and os.geteuid() == 0 and apt_get):
        why = "not root" if apt_get else "no apt-get"
        return False, f"nginx is not installed ({why}, so not installing it): {how}"
    env = dict(child_env(), DEBIAN_FRONTEND="noninteractive")
    before = service_pid()
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    install = [apt_get, *lock, "install", "-y", "-qq", "--no-install-recommends", "nginx"]
    rc = 1
    for refresh in (not apt_has_candidate("nginx"), True):
        if refresh:
            say(f"$ {apt_get} update -qq")
            subprocess.call([apt_get, *lock, "update", "-qq"], env=env, stdin=subprocess.DEVNULL)
        say("$ " + " ".join(install))
        rc = subprocess.call(install, cwd=ROOT, env=env, stdin=subprocess.DEVNULL)
        if rc == 0 or refresh:
            break
    if rc != 0:
        return False, f"apt-get install nginx failed (exit {rc}): {how}"
    started = service_pid()
    if started is not None and started != before:
        say(f"stopping nginx daemon {started} started by the package install")
        if not stop_pid(started):
            return False, f"nginx daemon {started} started by apt-get could not be stopped"
    found = find_nginx()
    if not found:
        return False, f"apt-get installed nginx but no binary was found: {how}"
    return True, f"installed {found}"


#: How the test step tells pytest which binary to use (set, it must be there).
BINARIES = {"pgbouncer": (PGBOUNCER_ENV, find_pgbouncer), "nginx": (NGINX_ENV, find_nginx)}


# --------------------------------------------------------------------------------------
# The built package (sdist + wheel), installed where the checkout cannot be imported
# --------------------------------------------------------------------------------------

#: What the wheel must carry besides every module of the checkout's package.
WHEEL_MUST_HAVE = ("flask_reqconn/py.typed",)
#: The subpackages named in the brief of issue 13, checked by name as well.
WHEEL_SUBPACKAGES = ("storm", "probes", "integrations", "testing")
#: What the fresh venv gets besides the wheel: the example suite's needs.
WHEEL_EXTRAS = "binary,testing"


def wheel_problems(wheel: Path) -> list[str]:
    """What is wrong with the built wheel's file list and metadata ([] when nothing)."""
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = next(
            (zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA")), ""
        )
    package = ROOT / "flask_reqconn"
    want = {p.relative_to(ROOT).as_posix() for p in package.rglob("*.py")}
    want.update(WHEEL_MUST_HAVE)
    problems = [f"missing from the wheel: {name}" for name in sorted(want - names)]
    for sub in WHEEL_SUBPACKAGES:
        if f"flask_reqconn/{sub}/__init__.py" not in names:
            problems.append(f"subpackage flask_reqconn.{sub} missing from the wheel")
    problems += [f"not for the wheel: {n}" for n in sorted(names) if n.split("/")[0] in
                 ("tests", "examples", "bench", "scripts", "docs")]  # fmt: skip
    if "License-Expression: BSD-3-Clause" not in metadata:
        problems.append("METADATA has no 'License-Expression: BSD-3-Clause'")
    if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
        problems.append("the LICENSE file is not in the wheel's .dist-info/licenses/")
    return problems


def check_package() -> tuple[bool, str]:
    """Build, check, install into a fresh venv, run the example suite; (ok, what happened)."""
    env = child_env()
    with tempfile.TemporaryDirectory(prefix="reqconn-pkg-") as tmp_name:
        tmp = Path(tmp_name)
        dist = tmp / "dist"

        def call(cmd: list[str], *, cwd: Path = ROOT, environ: dict[str, str] = env) -> bool:
            say("$ " + " ".join(cmd))
            return subprocess.call(cmd, cwd=cwd, env=environ, stdin=subprocess.DEVNULL) == 0

        python = str(venv_bin("python"))
        if not call([python, "-m", "build", "--sdist", "--wheel", "--outdir", str(dist), "."]):
            return False, "python -m build failed"
        built = sorted(dist.iterdir())
        wheels = [p for p in built if p.suffix == ".whl"]
        sdists = [p for p in built if p.name.endswith(".tar.gz")]
        if len(wheels) != 1 or len(sdists) != 1:
            return False, f"expected one wheel and one sdist, built {[p.name for p in built]}"
        if not call([python, "-m", "twine", "check", "--strict", *map(str, built)]):
            return False, "twine check failed"
        problems = wheel_problems(wheels[0])
        if problems:
            return False, "; ".join(problems)

        # A fresh venv without the checkout: the example suite runs from a copy in tmp
        venv = tmp / "venv"
        if not call([sys.executable, "-m", "venv", str(venv)]):
            return False, "python3 -m venv failed"
        fresh = dict(env, VIRTUAL_ENV=str(venv))
        fresh["PATH"] = os.pathsep.join([str(venv / "bin"), os.environ.get("PATH", os.defpath)])
        fresh.pop("PYTHONPATH", None)
        vpython = str(venv / "bin" / "python")
        if not call([vpython, "-m", "pip", "install", "-q", f"{wheels[0]}[{WHEEL_EXTRAS}]"],
                    environ=fresh):  # fmt: skip
            return False, "pip install of the built wheel failed"
        flaskr = tmp / "flaskr"
        shutil.copytree(ROOT / "examples" / "flaskr", flaskr,
                        ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))  # fmt: skip
        where = (
            "import flask_reqconn, sys; p = flask_reqconn.__file__; print(p);"
            f" sys.exit(0 if p.startswith({str(venv)!r}) else 1)"
        )
        if not call([vpython, "-c", where], cwd=flaskr, environ=fresh):
            return False, "flask_reqconn was not imported from the fresh venv"
        if not call([vpython, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=flaskr,
                    environ=fresh):  # fmt: skip
            return False, "the example suite failed against the installed wheel"
    return True, f"{wheels[0].name} and {sdists[0].name} checked; example suite passed on it"


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------


Step = tuple[str, list[str] | None, str | None]  # name, command (None: a check), skip reason
#: The TCP pass: the tests using the test PostgreSQL (the ``pg`` marker, which
#: tests/conftest.py adds) that are not slow, and the slow ones marked ``tcp``.
TCP_PASS = ["--pg-tcp", "-m", "pg and (not slow or tcp)"]


def plan_test_steps(args: list[str], *, fast: bool, docs_out: str) -> list[Step]:
    """What ``test`` (or ``test --fast``) runs, in order; *args* go to pytest."""
    python = str(venv_bin("python"))
    lint_dirs = [d for d in LINT_DIRS if (ROOT / d).is_dir()]
    has_package = (ROOT / "flask_reqconn" / "__init__.py").is_file()
    has_docs = (ROOT / "docs" / "conf.py").is_file()
    own_dsn = os.environ.get("REQCONN_TEST_DSN") or any(a.startswith("--test-dsn") for a in args)
    lint: list[Step] = [
        (
            "ruff",
            [str(venv_bin("ruff")), "check", *lint_dirs],
            None if lint_dirs else "nothing to lint",
        ),
        (
            "mypy",
            [python, "-m", "mypy"],
            None if has_package else "flask_reqconn/__init__.py absent",
        ),
    ]
    if fast:  # the contributor's loop: lint, types, and the tests not marked slow
        return [*lint, ("pytest", [python, "-m", "pytest", "-m", "not slow", *args], None)]
    return [
        *lint,
        (
            "sphinx",
            [python, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "docs", docs_out],
            None if has_docs else "docs/conf.py absent",
        ),
        ("pgbouncer", None, None),
        ("nginx", None, None),
        # the slowest tests named at the end: the suite must stay under 15 minutes
        ("pytest", [python, "-m", "pytest", "--durations=15", *args], None),
        # the PostgreSQL-facing tests again, over TCP (see the module's docstring)
        (
            "pytest tcp",
            [python, "-m", "pytest", *TCP_PASS, *args],
            "REQCONN_TEST_DSN or --test-dsn decides the transport" if own_dsn else None,
        ),
        # the example app's own suite, as its users run it (its pyproject.toml:
        # filterwarnings = error, flask-reqconn's pytest plugin)
        (
            "pytest flaskr",
            [python, "-m", "pytest", "-c", "examples/flaskr/pyproject.toml",
             "--rootdir", "examples/flaskr", "examples/flaskr/tests"],
            None if FLASKR_TESTS.is_dir() else "examples/flaskr/tests absent",
        ),  # fmt: skip
        # sdist + wheel built and checked, the wheel installed into a fresh venv, and
        # the example suite run from a copy outside the checkout against it
        ("package", None, None if FLASKR_TESTS.is_dir() else "examples/flaskr absent"),
    ]


def cmd_test(args: list[str]) -> int:
    fast = "--fast" in args
    args = [a for a in args if a != "--fast"]
    setup = ensure_venv()
    results: list[tuple[str, str, float]] = []
    if setup:
        results.append(("venv + install", "ok", setup))

    def summary() -> None:
        print("\n[dev] summary:", flush=True)
        for name, outcome, secs in results:
            print(f"[dev]   {name:<14} {outcome:<32} {secs:7.1f}s", flush=True)

    def step(name: str, cmd: list[str] | None, skip_reason: str | None = None) -> int:
        if skip_reason:
            say(f"--- {name}: skipped ({skip_reason})")
            results.append((name, f"skipped: {skip_reason}", 0.0))
            return 0
        say(f"--- {name}")
        t0 = time.monotonic()
        if cmd is None:  # a binary the tests run (pgbouncer, nginx), or the package check
            checks = {"pgbouncer": ensure_pgbouncer, "nginx": ensure_nginx,
                      "package": check_package}  # fmt: skip
            ok, what = checks[name]()
            say(f"{name}: {what}")
            if ok and name in BINARIES:  # the tests must use it, never skip for want of it
                env_name, find = BINARIES[name]
                os.environ[env_name] = find() or ""
            rc = 0 if ok else 1
        else:
            rc = run(cmd, check=False)
        secs = time.monotonic() - t0
        outcome = "ok" if rc == 0 else f"FAILED (exit {rc})"
        if name.startswith("pytest") and rc == 5:
            outcome = "FAILED (exit 5: no tests ran)"
        results.append((name, outcome, secs))
        say(f"--- {name}: {outcome} in {secs:.1f}s")
        return rc

    with tempfile.TemporaryDirectory(prefix="reqconn-docs-") as docs_out:
        for name, cmd, skip in plan_test_steps(args, fast=fast, docs_out=docs_out):
            rc = step(name, cmd, skip)
            if rc != 0:
                summary()
                say(f"FAILED at {name}")
                return rc
    summary()
    say("all steps passed")
    return 0


def cmd_demo(args: list[str]) -> int:
    if not (ROOT / "examples" / "demo.py").is_file():
        say("the demo is not there yet (examples/demo.py does not exist)")
        return 1
    ensure_venv()
    return run([str(venv_bin("python")), "-m", "examples.demo", *args], check=False)


def main(argv: list[str]) -> int:
    commands = {"test": cmd_test, "demo": cmd_demo}
    if not argv or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    os.chdir(ROOT)
    try:
        return commands[argv[0]](argv[1:])
    except KeyboardInterrupt:
        say("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
