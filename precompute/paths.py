"""Where the project's data folders are: inside the installed packages (a wheel) or at the top of a checkout.

The design card keeps ``templates/``, ``static/`` and ``alembic/`` at the repository's top level; a wheel carries
them inside the packages that read them (``app/templates``, ``app/static``, ``precompute/migrations``, mapped in
``pyproject.toml``), so a non-editable ``pip install .`` works from any directory. A checkout (editable install,
tests) has them only at the top level.
"""

from __future__ import annotations

from pathlib import Path


def package_folder(package_dir: Path, packaged_name: str, checkout_name: str) -> Path:
    """The folder a wheel installs as ``package_dir / packaged_name``, else the checkout's top-level one.

    The packaged location is tried first: next to an installed package, ``package_dir.parent`` is site-packages,
    where a top-level ``alembic`` is the Alembic library itself, not our migrations.

    >>> package_folder(Path("/nowhere/app"), "templates", "templates")
    PosixPath('/nowhere/templates')
    """
    packaged = package_dir / packaged_name
    if packaged.is_dir():
        return packaged
    return package_dir.parent / checkout_name
