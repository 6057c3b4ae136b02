"""Several registry replicas on one PostgreSQL: LISTEN/NOTIFY wakes every replica's streams.

Each write transaction runs `pg_notify('cityplane_registry', '<revision>')`; PostgreSQL delivers
it at commit, only if the transaction commits, to every session that LISTENs. Each replica
keeps one such session (a connection taken out of the engine's pool for good) and feeds the
revision to its local `Notifier`. Watch streams then read the changes from the database as
usual, so a NOTIFY carries no data and losing one costs latency, not correctness: streams also
re-read on every heartbeat, and after a reconnect the listener publishes the current revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.store import NOTIFY_CHANNEL

log = logging.getLogger(__name__)

_PING_EVERY = 10.0  # seconds; finds a dead listener connection even when nobody writes
_RETRY_AFTER = 1.0


class PostgresFanout:
    def __init__(
        self, engine: AsyncEngine, publish: Callable[[int], None], revision: Callable[[], Any]
    ) -> None:
        self._engine = engine
        self._publish = publish
        self._revision = revision  # async () -> int: the committed revision, on (re)connect
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()

    async def start(self, within: float = 5.0) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="registry-listen")
        async with asyncio.timeout(within):
            await self.listening.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            self._publish(int(payload))
        except ValueError:
            log.warning("ignoring a NOTIFY on %s that is not a revision", NOTIFY_CHANNEL)

    async def _listen_forever(self) -> None:
        while True:
            try:
                await self._listen_once()
            except (OSError, SQLAlchemyError, TimeoutError) as exc:
                log.warning("LISTEN connection lost (%s); reconnecting", exc)
            except Exception:
                # asyncpg's own errors (e.g. ConnectionDoesNotExistError) are not OSErrors.
                log.exception("LISTEN connection failed; reconnecting")
            self.listening.clear()
            await asyncio.sleep(_RETRY_AFTER)

    async def _listen_once(self) -> None:
        async with self._engine.connect() as conn:
            pooled = await conn.get_raw_connection()
            driver = pooled.driver_connection  # the asyncpg.Connection
            assert driver is not None
            closed = asyncio.Event()
            driver.add_termination_listener(lambda _c: closed.set())
            try:
                await driver.add_listener(NOTIFY_CHANNEL, self._on_notify)
                self.listening.set()
                # Whatever committed while we were not listening.
                self._publish(await self._revision())
                while not closed.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_PING_EVERY):
                            await closed.wait()
                    if not closed.is_set():
                        async with asyncio.timeout(_PING_EVERY):
                            await driver.execute("SELECT 1")
            finally:
                # Never hand a LISTENing connection back to the pool.
                await conn.invalidate()
        log.warning("LISTEN connection closed; reconnecting")
