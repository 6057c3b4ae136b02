"""The Dockerfile builds one image that carries every part: every package pyproject.toml ships is
in the build context and copied, and every data file those packages read at run time (templates,
migrations, word lists, CRDs) is declared as package data, since the image installs a wheel, not
the source tree. Docker itself is not needed (nor used) here."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest

from tests.charts.chart_support import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")
DOCKERIGNORE = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _top_level_packages() -> list[str]:
    patterns = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted(
        p.name
        for p in ROOT.iterdir()
        if (p / "__init__.py").exists() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns)
    )


def test_the_image_is_multi_stage_slim_and_runs_cityplane_as_a_numeric_user() -> None:
    stages = re.findall(r"^FROM\s+(\S+)", DOCKERFILE, re.MULTILINE)
    assert len(stages) >= 2
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", DOCKERFILE, re.MULTILINE)
    assert "-c constraints.txt" in DOCKERFILE
    assert re.search(r'^ENTRYPOINT \["cityplane"\]$', DOCKERFILE, re.MULTILINE)
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE, re.MULTILINE)
    assert users and re.fullmatch(r"\d+(:\d+)?", users[-1])
    assert not re.search(r"(?i)^(ENV|ARG)\s+\S*(TOKEN|PASSWORD|SECRET)", DOCKERFILE, re.MULTILINE)


@pytest.mark.parametrize("package", _top_level_packages())
def test_every_package_reaches_the_build_context_and_the_build_stage(package: str) -> None:
    assert f"!{package}/" in DOCKERIGNORE
    assert re.search(rf"^COPY {package}/ {package}/$", DOCKERFILE, re.MULTILINE)


def _data_files() -> list[Path]:
    files = []
    for package in _top_level_packages():
        for path in sorted((ROOT / package).rglob("*")):
            if (
                path.is_file()
                and path.suffix not in (".py", ".pyc")
                and "__pycache__" not in path.parts
                # Build output, like __pycache__: the image compiles its own (gateway/speedups.py).
                and "_compiled" not in path.parts
            ):
                files.append(path)
    return files


def _declared(path: Path) -> bool:
    """Whether setuptools' package-data globs (relative to the owning package) take `path`."""
    declared = PYPROJECT["tool"]["setuptools"].get("package-data", {})
    for package, globs in declared.items():
        base = ROOT / package.replace(".", "/") if package != "*" else None
        candidates = [base] if base else [p for p in path.parents if (p / "__init__.py").exists()]
        for root in candidates:
            if root is None or root not in path.parents:
                continue
            relative = path.relative_to(root).as_posix()
            if any(fnmatch.fnmatch(relative, g) for g in globs):
                return True
    return False


def test_every_data_file_the_packages_read_is_declared_package_data() -> None:
    missing = [p.relative_to(ROOT).as_posix() for p in _data_files() if not _declared(p)]
    assert missing == []
