"""Fixtures for the app's tests: atlas files precomputed once per session, copied fresh for every test.

The template file holds two complete runs of the tiny family from tests/conftest.py (see
`tests.dashboard_factories.family_template`): run 1 is reference-only without analyses, run 2 (the default) has
three models and analysis rows.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.dashboard_factories import copy_atlas, family_template, xss_template

REFERENCE_ONLY_RUN = 1
FULL_RUN = 2


@pytest.fixture(scope="session")
def atlas_template(tiny_family: dict[str, Any]) -> Path:
    return family_template(tiny_family["base"], tiny_family["permuted"], tiny_family["other"])


@pytest.fixture
def atlas_db(atlas_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the template for this test."""
    return copy_atlas(atlas_template, tmp_path / "atlas.db")


@pytest.fixture
def make_client() -> Iterator[Callable[..., TestClient]]:
    """Build a client for an atlas file with optional setting overrides."""
    from app.main import create_app
    from app.settings import Settings

    clients: list[TestClient] = []

    def make(db: Path, **settings: Any) -> TestClient:
        client = TestClient(create_app(Settings(db_path=db, **settings)), raise_server_exceptions=True)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(atlas_db: Path, make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(atlas_db)


@pytest.fixture(scope="session")
def xss_atlas_template() -> Path:
    return xss_template()


HTML = {"accept": "text/html"}


def query(db: Path, sql: str, *params: object) -> list[tuple]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute(sql, params).fetchall()
