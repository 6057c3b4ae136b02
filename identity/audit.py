"""The audit log: every login, step-up, consent, token issuance and admin change, append-only and
hash-chained (identity/audit_chain.py).

Writes are group-committed: `record()` queues an entry and waits until the transaction holding it
has committed, so a response never claims something the log does not hold, while a burst of
client-credentials grants costs one transaction per batch instead of one per token. The chain
needs one writer at a time: PostgreSQL replicas take an advisory lock, SQLite's `BEGIN
IMMEDIATE` already serializes writers.

A grant's writes (identity/store.py `Write`) commit in the same batch. Its conditional update
runs first, so a lost race has written nothing and needs no savepoint (one only when an entry
brings several conditional updates). The plain writes of the entries that held run after all of
the batch's conditional updates, consecutive ones of a statement as one executemany: they are
inserts of new codes and tokens, which no conditional update of the same batch can be looking
for (nobody knows them before the batch commits). With the statements built once, this took a
refresh grant's share of a batch from ~1,300 to ~250 µs of CPU (SQLite, batches of 16).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cityplane.storage import is_postgresql, writer
from identity.audit_chain import GENESIS, chain_hash, verify_chain
from identity.models import audit_log

if TYPE_CHECKING:
    from identity.store import Write

log = logging.getLogger(__name__)

_AUDIT_LOCK = 0x41554449  # "AUDI"
_BATCH = 500
# (entry, the writes to make with it, the caller's future: did they hold?)
_Item = tuple[dict[str, Any], tuple["Write", ...], "asyncio.Future[bool]"]


class AuditLog:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def stop(self) -> None:
        if self._task is not None:
            await self._queue.join()  # what was recorded gets written
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def record(
        self,
        action: str,
        *,
        actor: str | None = None,
        subject: str | None = None,
        client_id: str | None = None,
        ip: str | None = None,
        writes: Sequence[Write] = (),
        **detail: Any,
    ) -> bool:
        """Append an entry, after running `writes` in the same transaction. False when a
        must-match statement matched no row (a concurrent request won the race): the entry's
        writes are not made and nothing is logged."""
        entry = {
            "at": time.time(),
            "action": action,
            "actor": actor,
            "subject": subject,
            "client_id": client_id,
            "ip": ip,
            "detail": detail,
        }
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        await self._queue.put((entry, tuple(writes), done))
        return await done

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < _BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                outcomes = await self._write(batch)
            except Exception as exc:  # the callers see the failure; the writer lives on
                log.exception("audit write failed")
                for _, _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                    self._queue.task_done()
                continue
            for (_, _, done), outcome in zip(batch, outcomes, strict=True):
                if not done.done():
                    done.set_result(outcome)
                self._queue.task_done()

    async def _write(self, batch: list[_Item]) -> list[bool]:
        """One transaction for the whole batch: each item's conditional writes first (a lost
        race undoes that item only), then the plain writes and the entries of the items that
        held."""
        outcomes = []
        entries = []
        plain: list[Write] = []
        async with writer(self._engine).begin() as conn:
            if is_postgresql(self._engine):
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _AUDIT_LOCK})
            for entry, writes, _ in batch:
                held = await _conditional(conn, [w for w in writes if w.must_match])
                outcomes.append(held)
                if held:
                    plain.extend(w for w in writes if not w.must_match)
                    entries.append(entry)
            if not entries:
                return outcomes
            await _executemany(conn, plain)
            last = (
                await conn.execute(
                    select(audit_log.c.hash).order_by(audit_log.c.seq.desc()).limit(1)
                )
            ).first()
            prev = last[0] if last else GENESIS
            rows = []
            for entry in entries:
                prev = chain_hash(prev, entry)
                rows.append({**entry, "hash": prev})
            await conn.execute(insert(audit_log), rows)
        return outcomes

    async def entries(
        self, *, subject: str | None = None, actions: tuple[str, ...] = (), limit: int = 100
    ) -> list[dict[str, Any]]:
        query = select(audit_log).order_by(audit_log.c.seq.desc()).limit(limit)
        if subject is not None:
            query = query.where(audit_log.c.subject == subject)
        if actions:
            query = query.where(audit_log.c.action.in_(actions))
        async with self._engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(query)).mappings()]

    async def verify(self) -> int | None:
        """Index of the first entry whose hash does not match the chain, None when intact."""
        async with self._engine.connect() as conn:
            rows = (
                (await conn.execute(select(audit_log).order_by(audit_log.c.seq))).mappings().all()
            )
        keys = ("at", "action", "actor", "subject", "client_id", "ip", "detail")
        return verify_chain(({k: r[k] for k in keys}, r["hash"]) for r in rows)


async def _conditional(conn: AsyncConnection, writes: list[Write]) -> bool:
    """Did every conditional update match a row? Only then are they kept."""
    if len(writes) == 1:  # matched nothing -> wrote nothing: no savepoint needed
        statement, params, _ = writes[0]
        return bool((await conn.execute(statement, params)).rowcount)
    if not writes:
        return True
    savepoint = await conn.begin_nested()
    for statement, params, _ in writes:
        if not (await conn.execute(statement, params)).rowcount:
            await savepoint.rollback()
            return False
    await savepoint.commit()
    return True


async def _executemany(conn: AsyncConnection, writes: list[Write]) -> None:
    """``writes`` in order, consecutive ones of the same statement as one executemany."""
    start = 0
    while start < len(writes):
        end = start + 1
        while end < len(writes) and writes[end].statement is writes[start].statement:
            end += 1
        await conn.execute(writes[start].statement, [w.params for w in writes[start:end]])
        start = end
