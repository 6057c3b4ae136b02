"""Browser sessions at the hub: in the database (default), or in Redis when configured
(`--redis-url`), where they expire by themselves and every page view is one round trip.

A session holds the random id its cookie carries, the account once signed in, and its state:
what was verified (method, time, device), the CSRF token, the sign-ins in progress.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from redis.asyncio import Redis
from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from cityplane.storage import writer
from identity.models import sessions


@dataclass(slots=True)
class Session:
    id: str
    account_id: str | None
    state: dict[str, Any]
    created_at: float
    seen_at: float
    expires_at: float
    user_agent: str | None = None
    ip: str | None = None


class SessionBackend(Protocol):
    async def create(
        self, *, lifetime: float, user_agent: str | None, ip: str | None
    ) -> Session: ...
    async def get(self, session_id: str) -> Session | None: ...
    async def save(self, session: Session) -> None: ...
    async def end(self, session_id: str) -> None: ...
    async def of_account(self, account_id: str) -> list[Session]: ...


def _new(lifetime: float, user_agent: str | None, ip: str | None) -> Session:
    now = time.time()
    # The CSRF token is born with the session, so every page rendered from it carries one.
    state: dict[str, Any] = {"csrf": secrets.token_urlsafe(24)}
    return Session(
        secrets.token_urlsafe(32),
        None,
        state,
        now,
        now,
        now + lifetime,
        (user_agent or "")[:256],
        ip,
    )


class DatabaseSessions:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._w = writer(engine)

    async def create(self, *, lifetime: float, user_agent: str | None, ip: str | None) -> Session:
        session = _new(lifetime, user_agent, ip)
        async with self._w.begin() as conn:
            await conn.execute(
                insert(sessions).values(
                    id=session.id,
                    account_id=None,
                    state=session.state,
                    created_at=session.created_at,
                    seen_at=session.seen_at,
                    expires_at=session.expires_at,
                    user_agent=session.user_agent,
                    ip=ip,
                )
            )
        return session

    async def get(self, session_id: str) -> Session | None:
        async with self.engine.connect() as conn:
            row = (
                (await conn.execute(select(sessions).where(sessions.c.id == session_id)))
                .mappings()
                .first()
            )
        if row is None or row["expires_at"] <= time.time():
            return None
        return Session(**{**row, "state": dict(row["state"])})

    async def save(self, session: Session) -> None:
        session.seen_at = time.time()
        async with self._w.begin() as conn:
            await conn.execute(
                update(sessions)
                .where(sessions.c.id == session.id)
                .values(account_id=session.account_id, state=session.state, seen_at=session.seen_at)
            )

    async def end(self, session_id: str) -> None:
        async with self._w.begin() as conn:
            await conn.execute(delete(sessions).where(sessions.c.id == session_id))

    async def of_account(self, account_id: str) -> list[Session]:
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(sessions)
                    .where(sessions.c.account_id == account_id)
                    .where(sessions.c.expires_at > time.time())
                    .order_by(sessions.c.seen_at.desc())
                )
            ).mappings()
            return [Session(**{**r, "state": dict(r["state"])}) for r in rows]


class RedisSessions:
    """Sessions as JSON values that expire with the session; a set per account lists its
    sessions for the account page (members whose value expired are dropped when read)."""

    def __init__(self, redis: Redis, *, prefix: str = "cityplane:identity:") -> None:
        self._redis = redis
        self._prefix = prefix

    def _key(self, session_id: str) -> str:
        return f"{self._prefix}session:{session_id}"

    def _index(self, account_id: str) -> str:
        return f"{self._prefix}account-sessions:{account_id}"

    async def create(self, *, lifetime: float, user_agent: str | None, ip: str | None) -> Session:
        session = _new(lifetime, user_agent, ip)
        await self._redis.set(
            self._key(session.id), json.dumps(asdict(session)), px=max(1, int(lifetime * 1000))
        )
        return session

    async def get(self, session_id: str) -> Session | None:
        raw = await self._redis.get(self._key(session_id))
        if raw is None:
            return None
        session = Session(**json.loads(raw))
        return session if session.expires_at > time.time() else None

    async def save(self, session: Session) -> None:
        session.seen_at = time.time()
        ttl = int((session.expires_at - session.seen_at) * 1000)
        if ttl <= 0:
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key(session.id), json.dumps(asdict(session)), px=ttl, xx=True)
            if session.account_id:
                index = self._index(session.account_id)
                pipe.sadd(index, session.id)
                pipe.pexpire(index, ttl, gt=True)
            await pipe.execute()

    async def end(self, session_id: str) -> None:
        session = await self.get(session_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(session_id))
            if session is not None and session.account_id:
                pipe.srem(self._index(session.account_id), session_id)
            await pipe.execute()

    async def of_account(self, account_id: str) -> list[Session]:
        index = self._index(account_id)
        ids = sorted(
            m.decode() if isinstance(m, bytes) else str(m)
            for m in await self._redis.smembers(index)
        )
        if not ids:
            return []
        values = await self._redis.mget([self._key(i) for i in ids])
        found, gone = [], []
        for session_id, raw in zip(ids, values, strict=True):
            if raw is None:
                gone.append(session_id)
            else:
                found.append(Session(**json.loads(raw)))
        if gone:
            await self._redis.srem(index, *gone)
        return sorted(found, key=lambda s: s.seen_at, reverse=True)
