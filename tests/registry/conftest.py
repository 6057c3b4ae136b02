"""Registries on real sockets, over SQLite (tmp_path) and the real PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from registry.app import RegistrySettings, RunningRegistry, start_registry
from tests.registry.support import Api, postgres_available, postgres_database

StartRegistry = Callable[..., Awaitable[RunningRegistry]]
_postgres: bool | None = None


async def _require_postgres() -> None:
    global _postgres
    if _postgres is None:
        _postgres = await postgres_available()
    if not _postgres:
        if os.environ.get("CI"):
            # CI promises a real PostgreSQL: a missing one is a failure, not a skip.
            pytest.fail("PostgreSQL is not running at CITYPLANE_TEST_POSTGRES (CI)")
        pytest.skip("PostgreSQL is not running at CITYPLANE_TEST_POSTGRES")


@asynccontextmanager
async def _registries(database_url: str, data_dir: Path) -> AsyncIterator[StartRegistry]:
    running: list[RunningRegistry] = []

    async def make(**settings: Any) -> RunningRegistry:
        settings.setdefault("data_dir", data_dir)
        settings.setdefault("database_url", database_url)
        settings.setdefault("port", 0)
        registry = await start_registry(RegistrySettings(**settings))
        running.append(registry)
        return registry

    try:
        yield make
    finally:
        for registry in running:
            await registry.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"
        return
    await _require_postgres()
    async with postgres_database() as url:
        yield url


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    await _require_postgres()
    async with postgres_database() as url:
        yield url


@pytest.fixture
async def start(database_url: str, tmp_path: Path) -> AsyncIterator[StartRegistry]:
    """Start registries on the test's database (both backends); all stop at the end."""
    async with _registries(database_url, tmp_path / "data") as make:
        yield make


@pytest.fixture
async def start_on_postgres(postgres_url: str, tmp_path: Path) -> AsyncIterator[StartRegistry]:
    """Start registries (replicas) on one PostgreSQL database."""
    async with _registries(postgres_url, tmp_path / "data") as make:
        yield make


@pytest.fixture
async def registry(start: StartRegistry) -> RunningRegistry:
    return await start()


@pytest.fixture
async def session() -> AsyncIterator[ClientSession]:
    async with ClientSession() as session:
        yield session


@pytest.fixture
def api(registry: RunningRegistry, session: ClientSession) -> Api:
    return Api(session, registry.url, registry.admin_token)
