"""The wheel installs one top-level package, `fedmerge`, and works without the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the build leaves nothing in the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package_dir in PYPROJECT["tool"]["setuptools"]["package-dir"].values():
        shutil.copytree(
            ROOT / package_dir, src / package_dir, ignore=shutil.ignore_patterns("__pycache__")
        )
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(out),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (built,) = out.glob("fedmerge-*.whl")
    return built


def test_the_wheel_installs_only_fedmerge(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"fedmerge"}
    for module in (
        "fedmerge/__init__.py",
        "fedmerge/federation/runner.py",
        "fedmerge/clients/tasks/text.py",
        "fedmerge/aggregators/fedavg.py",
    ):
        assert module in names


def test_the_installed_wheel_imports_without_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    code = (
        "import fedmerge, fedmerge.federation.runner as r; "
        "print(fedmerge.__path__[0]); print(r.__file__); print(len(fedmerge.available()) > 5)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout.split()
    assert out[0] == str(target / "fedmerge")
    assert Path(out[1]).is_relative_to(target)
    assert out[2] == "True"


def test_the_source_packages_refuse_their_bare_names():
    """In a checkout the repository root is importable; a second copy of the registries under the
    bare names would split every registration in two, so the bare names fail with the fix."""
    for bare in ("aggregators", "clients", "federation"):
        proc = subprocess.run(
            [sys.executable, "-c", f"import {bare}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode != 0
        assert f"import this package as fedmerge.{bare}" in proc.stderr


def test_requires_python_is_true():
    """config.py reads TOML with tomllib, new in Python 3.11."""
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    assert "import tomllib" in (ROOT / "federation" / "config.py").read_text()
