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
