"""Rows looked up by key together: the read-side twin of the audit log's group commit.

Every refresh-token grant reads one row by its digest before Authlib runs (ADR 0007). One
SELECT through async SQLAlchemy costs far more than the row: on SQLite each statement is
several hops to aiosqlite's thread (BEGIN, cursor, execute, fetch, close, rollback), each a pair
of context switches on the hub's core; on PostgreSQL it is a round trip. So while one SELECT is
in flight, the keys asked for meanwhile wait and go together in the next one (``WHERE key IN
(...)``). An idle hub sends each lookup at once; a busy one sends one query per round instead of
one per grant. Every caller gets the row as it was when its round read it, as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import Column, bindparam, select
from sqlalchemy.ext.asyncio import AsyncEngine

_ROUND = 500  # keys per SELECT: well under SQLite's and asyncpg's bound-parameter limits


class GroupedLookup:
    """Rows of one table by a unique column, many lookups per SELECT under load."""

    def __init__(self, engine: AsyncEngine, key: Column[Any]) -> None:
        self._engine = engine
        self._key = key.name
        self._select = select(key.table).where(key.in_(bindparam("keys", expanding=True)))
        self._waiting: dict[Any, list[asyncio.Future[dict[str, Any] | None]]] = {}
        self._rounds: asyncio.Task[None] | None = None

    async def get(self, key: Any) -> dict[str, Any] | None:
        future: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(future)
        if self._rounds is None:
            self._rounds = asyncio.create_task(self._run(), name="grouped-lookup")
        return await future

    async def _run(self) -> None:
        try:
            while self._waiting:
                keys = list(self._waiting)[:_ROUND]
                round_ = {k: self._waiting.pop(k) for k in keys}
                try:
                    found = await self._read(keys)
                except Exception as exc:  # noqa: BLE001 - each caller gets it, as from its own read
                    for futures in round_.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                    continue
                except BaseException:  # cancelled (the loop is closing): so are the callers
                    for futures in round_.values():
                        for future in futures:
                            future.cancel()
                    raise
                for k, futures in round_.items():
                    row = found.get(k)
                    for future in futures:
                        if not future.done():  # the caller may have gone (cancelled)
                            future.set_result(None if row is None else dict(row))
        finally:
            self._rounds = None

    async def _read(self, keys: list[Any]) -> dict[Any, Any]:
        async with self._engine.connect() as conn:
            result = await conn.execute(self._select, {"keys": keys})
            return {row[self._key]: row for row in result.mappings()}
