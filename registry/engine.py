"""The registry's database engine: the shared storage kernel (cityplane/storage.py) with the
registry's migrations and migration lock."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from cityplane import storage
from cityplane.storage import WRITE, is_postgresql, make_engine, ping, sqlite_url, writer

__all__ = ["WRITE", "is_postgresql", "make_engine", "migrate", "ping", "sqlite_url", "writer"]

# Arbitrary, fixed: replicas starting together on one PostgreSQL migrate one at a time.
_MIGRATION_LOCK = 0x43495459  # "CITY"


async def migrate(engine: AsyncEngine) -> None:
    """Bring the registry's schema to the newest migration, in one transaction."""
    await storage.migrate(engine, "registry:migrations", _MIGRATION_LOCK)
