"""The wheel's package list in pyproject.toml names every package folder, and maps the top-level asset folders.

Packages are listed explicitly (setuptools cannot combine `find` with the mapping of templates/, static/ and
alembic/ into the packages that read them), so a new subpackage that is not listed would be missing from a wheel.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_python_package_folder_is_listed():
    listed = set(_setuptools()["packages"])
    folders = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for top in ("app", "precompute", "cli")
        for path in (ROOT / top).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert folders - listed == set(), "add these packages to [tool.setuptools] packages"


def test_asset_folders_are_mapped_into_the_packages_that_read_them():
    mapping = _setuptools()["package-dir"]
    assert mapping["app.templates"] == "templates"
    assert mapping["app.static"] == "static"
    assert mapping["precompute.migrations"] == "alembic"
    for package, folder in mapping.items():
        if package:
            assert (ROOT / folder).is_dir() and package in _setuptools()["packages"]
