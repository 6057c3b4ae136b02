"""The storage engine every stateful part shares: SQLite by default, PostgreSQL for replicas.

SQLite through pysqlite does not emit `BEGIN` before a `SELECT`, so two reads of one "transaction"
could see different commits, and two writers that both read first deadlock on the upgrade to a
write lock (SQLITE_BUSY at once, no waiting). We therefore take transaction control back
(SQLAlchemy's documented recipe): reads start with `BEGIN`, writes with `BEGIN IMMEDIATE`, which
takes the write lock up front and queues behind `busy_timeout`. WAL lets readers run while a
write is in progress.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

log = logging.getLogger(__name__)

WRITE = "cityplane_write"


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path.resolve()}"


def is_postgresql(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "postgresql"


def make_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An engine for reads; `writer(engine)` gives the one for writes (same pool)."""
    engine = create_async_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        _take_sqlite_transaction_control(engine)
    return engine


def writer(engine: AsyncEngine) -> AsyncEngine:
    return engine.execution_options(**{WRITE: True})


def _take_sqlite_transaction_control(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves, below
        cursor = dbapi_connection.cursor()
        # synchronous=NORMAL with WAL: a commit survives the process crashing, and the database
        # stays consistent; only a power loss can take the last commits (SQLite's documented
        # trade-off). It halves the fsyncs per commit; production runs on PostgreSQL.
        pragmas = (
            "journal_mode=WAL",
            "synchronous=NORMAL",
            "busy_timeout=10000",
            "foreign_keys=ON",
        )
        for pragma in pragmas:
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


async def migrate(engine: AsyncEngine, script_location: str, lock_key: int) -> None:
    """Bring the schema to the newest migration of `script_location`, in one transaction (DDL is
    transactional in SQLite and PostgreSQL). Replicas starting together on one PostgreSQL take
    the advisory lock `lock_key` and migrate one at a time."""

    def upgrade(connection: Connection) -> None:
        config = Config()
        config.set_main_option("script_location", script_location)
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    async with writer(engine).begin() as conn:
        if is_postgresql(engine):
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key})
        await conn.run_sync(upgrade)


async def ping(engine: AsyncEngine, within: float = 2.0) -> bool:
    """Does the database answer? (for `/readyz`; a failure is logged, never raised)"""
    try:
        async with asyncio.timeout(within), engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except (OSError, TimeoutError, SQLAlchemyError) as exc:
        log.warning("database ping failed: %s", exc)
        return False
    return True


def safe_url(url: str) -> str:
    """The URL for messages and logs: the password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(unparseable URL)"
