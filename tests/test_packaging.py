"""The package metadata, and the check ``scripts/dev.py test`` runs on the built wheel.

The build itself (sdist + wheel, ``twine check``, the wheel installed into a fresh venv and
the example app's suite run against it from outside the checkout) is the ``package`` step
of ``scripts/dev.py test``; these tests keep its wheel check honest without a build.
"""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path
from types import ModuleType

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dev() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reqconn_dev_script", ROOT / "scripts" / "dev.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_license_is_an_spdx_expression_with_its_file() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "BSD-3-Clause"
    assert pyproject["project"]["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("BSD 3-Clause License")
    # PEP 639 license expressions need setuptools 77
    assert "setuptools>=77" in pyproject["build-system"]["requires"]
    dev_extra = pyproject["project"]["optional-dependencies"]["dev"]
    assert any(d.startswith("build") for d in dev_extra)
    assert any(d.startswith("twine") for d in dev_extra)


def make_wheel(path: Path, names: list[str], metadata: str) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name in names:
            zf.writestr(name, "")
        zf.writestr("flask_reqconn-0.dist-info/METADATA", metadata)
    return path


def package_files() -> list[str]:
    return [p.relative_to(ROOT).as_posix() for p in (ROOT / "flask_reqconn").rglob("*.py")]


GOOD_METADATA = "Metadata-Version: 2.4\nName: flask-reqconn\nLicense-Expression: BSD-3-Clause\n"
LICENSE = "flask_reqconn-0.dist-info/licenses/LICENSE"


def test_a_complete_wheel_passes_the_check(dev: ModuleType, tmp_path: Path) -> None:
    names = [*package_files(), "flask_reqconn/py.typed", LICENSE]
    assert dev.wheel_problems(make_wheel(tmp_path / "w.whl", names, GOOD_METADATA)) == []


def test_the_wheel_check_finds_what_is_missing_or_should_not_be_there(
    dev: ModuleType, tmp_path: Path
) -> None:
    names = [n for n in package_files() if not n.startswith("flask_reqconn/storm/")]
    names += ["tests/test_x.py", "tests/conftest.py"]
    wheel = make_wheel(tmp_path / "w.whl", names, "Metadata-Version: 2.4\nLicense: BSD\n")
    problems = dev.wheel_problems(wheel)
    assert "missing from the wheel: flask_reqconn/py.typed" in problems
    assert "missing from the wheel: flask_reqconn/storm/__init__.py" in problems
    assert "subpackage flask_reqconn.storm missing from the wheel" in problems
    assert "not for the wheel: tests/test_x.py" in problems
    assert "METADATA has no 'License-Expression: BSD-3-Clause'" in problems
    assert "the LICENSE file is not in the wheel's .dist-info/licenses/" in problems


def test_the_fast_loop_is_lint_types_and_the_tests_not_marked_slow(dev: ModuleType) -> None:
    steps = dev.plan_test_steps(["tests/test_config.py"], fast=True, docs_out="/nowhere")
    assert [name for name, _, _ in steps] == ["ruff", "mypy", "pytest"]
    assert steps[-1][1][-4:] == ["pytest", "-m", "not slow", "tests/test_config.py"]


def test_the_full_run_builds_docs_and_package_and_needs_pgbouncer_and_nginx(
    dev: ModuleType,
) -> None:
    steps = dev.plan_test_steps([], fast=False, docs_out="/nowhere")
    names = [name for name, _, _ in steps]
    assert names[:5] == ["ruff", "mypy", "sphinx", "pgbouncer", "nginx"]
    assert names[-2:] == ["pytest flaskr", "package"]
    cmds = {name: cmd for name, cmd, _ in steps}
    # everything, slow tests included, the slowest named
    assert cmds["pytest"][-3:] == ["-m", "pytest", "--durations=15"]
    assert names.index("pytest tcp") == names.index("pytest") + 1
    assert cmds["pytest tcp"][-4:] == ["pytest", "--pg-tcp", "-m", "pg and (not slow or tcp)"]


def test_the_tcp_pass_is_skipped_for_a_server_of_ones_own(
    dev: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQCONN_TEST_DSN", "host=127.0.0.1 dbname=test")
    skips = {name: skip for name, _, skip in dev.plan_test_steps([], fast=False, docs_out="")}
    assert skips["pytest tcp"] == "REQCONN_TEST_DSN or --test-dsn decides the transport"
    assert skips["pytest"] is None


def test_ci_runs_the_readmes_test_command() -> None:
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line for line in readme if line.startswith("python3 scripts/dev.py test")]
    assert commands[0] == "python3 scripts/dev.py test"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == "exec " + commands[0]
