"""The Alembic migrations build exactly the tables `registry/models.py` describes."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from registry.engine import make_engine, migrate
from registry.models import metadata


def _differences(connection: Connection) -> list[Any]:
    return list(compare_metadata(MigrationContext.configure(connection), metadata))


async def test_migrations_match_the_models_and_run_twice_without_harm(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        await migrate(engine)
        await migrate(engine)  # a restart: nothing to do
        async with engine.connect() as conn:
            assert await conn.run_sync(_differences) == []
            head = await conn.exec_driver_sql("SELECT version_num FROM alembic_version")
            assert head.scalar_one() == "0003"
            counter = await conn.exec_driver_sql("SELECT id, value FROM revision")
            assert counter.all() == [(1, 0)]
    finally:
        await engine.dispose()
