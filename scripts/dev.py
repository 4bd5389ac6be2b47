#!/usr/bin/env python3
"""The project's two commands, needing nothing but Python 3.10+:

    python3 scripts/dev.py test [PYTEST ARGS...]   lint, type-check, docs, then pytest
    python3 scripts/dev.py demo [DEMO ARGS...]     run examples/demo.py

Both first make sure ``.venv`` in the repository exists and has the project installed
editable with its ``dev`` extra (``pip install -e '.[dev]'``). The install is redone only
when pyproject.toml (or this script's install recipe) changed, or the venv is broken.

Set ``REQCONN_TEST_DSN`` to test against an existing PostgreSQL instead of a throwaway one.
Standard library only.
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
# Commands
# --------------------------------------------------------------------------------------


def cmd_test(args: list[str]) -> int:
    setup = ensure_venv()
    python = str(venv_bin("python"))
    results: list[tuple[str, str, float]] = []
    if setup:
        results.append(("venv + install", "ok", setup))

    def summary() -> None:
        print("\n[dev] summary:", flush=True)
        for name, outcome, secs in results:
            print(f"[dev]   {name:<14} {outcome:<32} {secs:7.1f}s", flush=True)

    def step(name: str, cmd: list[str], skip_reason: str | None = None) -> int:
        if skip_reason:
            say(f"--- {name}: skipped ({skip_reason})")
            results.append((name, f"skipped: {skip_reason}", 0.0))
            return 0
        say(f"--- {name}")
        t0 = time.monotonic()
        rc = run(cmd, check=False)
        secs = time.monotonic() - t0
        outcome = "ok" if rc == 0 else f"FAILED (exit {rc})"
        if name == "pytest" and rc == 5:
            outcome = "FAILED (exit 5: no tests ran)"
        results.append((name, outcome, secs))
        say(f"--- {name}: {outcome} in {secs:.1f}s")
        return rc

    lint_dirs = [d for d in LINT_DIRS if (ROOT / d).is_dir()]
    has_package = (ROOT / "flask_reqconn" / "__init__.py").is_file()
    has_docs = (ROOT / "docs" / "conf.py").is_file()

    with tempfile.TemporaryDirectory(prefix="reqconn-docs-") as docs_out:
        steps = [
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
            (
                "sphinx",
                [python, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "docs", docs_out],
                None if has_docs else "docs/conf.py absent",
            ),
            ("pytest", [python, "-m", "pytest", *args], None),
        ]
        for name, cmd, skip in steps:
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
