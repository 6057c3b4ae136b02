"""The hub's data access beyond accounts (identity/accounts.py): clients, sessions, codes,
refresh tokens, consents. Async SQLAlchemy Core; every write is one short transaction."""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from sqlalchemy import Executable, bindparam, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from identity.accounts import Account, AccountStore, DuplicateError, Membership
from identity.clients import ClientSpec, HubClient, digest, new_secret
from identity.group_read import GroupedLookup
from identity.models import (
    authorization_codes,
    clients,
    consents,
    refresh_tokens,
    revoked_jtis,
)
from identity.sessions import DatabaseSessions, Session, SessionBackend

__all__ = ["Account", "DuplicateError", "IdentityStore", "Membership", "Session", "Write"]


class Write(NamedTuple):
    """One statement a grant wants made, committed after the grant ran (ADR 0007).

    ``must_match``: a conditional update (a code or a refresh token marked used) that must match
    a row; when it matches none, a concurrent use won and the grant's writes are undone. The
    statements on the token path are built once at import with bind parameters and run with
    ``params``: building one per grant cost more CPU (SQLAlchemy's cache key over every column)
    than running it."""

    statement: Executable
    params: dict[str, Any]
    must_match: bool = False


_CODE_BY_DIGEST = select(authorization_codes).where(
    authorization_codes.c.digest == bindparam("digest")
)


class IdentityStore(AccountStore):
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        client_cache_ttl: float = 5.0,
        sessions: SessionBackend | None = None,
    ) -> None:
        super().__init__(engine, cache_ttl=client_cache_ttl)
        self.sessions: SessionBackend = sessions or DatabaseSessions(engine)
        # Clients are read on every token request and change rarely: a short TTL cache keeps the
        # database off the client-credentials hot path; admin writes on this replica drop it.
        self._client_ttl = client_cache_ttl
        self._client_cache: dict[str, tuple[float, HubClient | None]] = {}
        # Every refresh grant reads its token first; concurrent grants share one SELECT.
        self._refresh_tokens = GroupedLookup(engine, refresh_tokens.c.digest)

    # --- clients
    async def client(self, client_id: str) -> HubClient | None:
        now = time.monotonic()
        cached = self._client_cache.get(client_id)
        if cached is not None and now - cached[0] < self._client_ttl:
            return cached[1]
        async with self.engine.connect() as conn:
            row = (
                (await conn.execute(select(clients).where(clients.c.client_id == client_id)))
                .mappings()
                .first()
            )
        found = None
        if row is not None:
            found = HubClient(
                row["client_id"],
                ClientSpec.model_validate(row["spec"]),
                row["secret_digest"],
                row["created_at"],
            )
        if len(self._client_cache) > 10_000:  # unknown ids are cached too: bound the memory
            self._client_cache.clear()
        self._client_cache[client_id] = (now, found)
        return found

    async def list_clients(self) -> list[HubClient]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(clients).order_by(clients.c.client_id))).mappings()
            return [
                HubClient(
                    r["client_id"],
                    ClientSpec.model_validate(r["spec"]),
                    r["secret_digest"],
                    r["created_at"],
                )
                for r in rows
            ]

    async def put_client(
        self, client_id: str, spec: ClientSpec, *, secret: str | None = None
    ) -> tuple[HubClient, str | None, bool]:
        """Create or update. Returns (client, the new secret when created, created?)."""
        now = time.time()
        self._client_cache.pop(client_id, None)
        async with self._w.begin() as conn:
            exists = (
                await conn.execute(
                    select(clients.c.client_id).where(clients.c.client_id == client_id)
                )
            ).first()
            if exists:
                await conn.execute(
                    update(clients)
                    .where(clients.c.client_id == client_id)
                    .values(spec=spec.model_dump(), updated_at=now)
                )
                created, secret = False, None
            else:
                secret = None if spec.public else (secret or new_secret())
                await conn.execute(
                    insert(clients).values(
                        client_id=client_id,
                        secret_digest=digest(secret) if secret else None,
                        spec=spec.model_dump(),
                        created_at=now,
                        updated_at=now,
                    )
                )
                created = True
        found = await self.client(client_id)
        assert found is not None
        return found, secret, created

    async def rotate_client_secret(self, client_id: str) -> str | None:
        secret = new_secret()
        self._client_cache.pop(client_id, None)
        async with self._w.begin() as conn:
            result = await conn.execute(
                update(clients)
                .where(clients.c.client_id == client_id)
                .values(secret_digest=digest(secret), updated_at=time.time())
            )
        return secret if result.rowcount else None

    async def delete_client(self, client_id: str) -> bool:
        self._client_cache.pop(client_id, None)
        async with self._w.begin() as conn:
            result = await conn.execute(delete(clients).where(clients.c.client_id == client_id))
            await conn.execute(delete(consents).where(consents.c.client_id == client_id))
            await conn.execute(
                update(refresh_tokens)
                .where(refresh_tokens.c.client_id == client_id)
                .values(revoked=True)
            )
        return bool(result.rowcount)

    # --- sessions: in the database, or in Redis when configured (identity/sessions.py)
    async def create_session(
        self, *, lifetime: float, user_agent: str | None, ip: str | None
    ) -> Session:
        return await self.sessions.create(lifetime=lifetime, user_agent=user_agent, ip=ip)

    async def session(self, session_id: str) -> Session | None:
        return await self.sessions.get(session_id)

    async def save_session(self, session: Session) -> None:
        await self.sessions.save(session)

    async def end_session(self, session_id: str) -> None:
        await self.sessions.end(session_id)

    async def sessions_of(self, account_id: str) -> list[Session]:
        return await self.sessions.of_account(account_id)

    # --- authorization codes and refresh tokens (rows written after Authlib's grant ran)
    async def write(self, writes: list[Write]) -> bool:
        """Run the grant's writes in one transaction. Conditional updates (a code or a refresh
        token marked used) that match no row mean a concurrent use won: roll back, say False."""
        async with self._w.begin() as conn:
            for statement, params, must_match in writes:
                result = await conn.execute(statement, params)
                if must_match and not result.rowcount:
                    await conn.rollback()
                    return False
        return True

    async def code(self, code_digest: str) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            result = await conn.execute(_CODE_BY_DIGEST, {"digest": code_digest})
            row = result.mappings().first()
        return None if row is None else dict(row)

    async def refresh_token(self, token_digest: str) -> dict[str, Any] | None:
        return await self._refresh_tokens.get(token_digest)

    async def revoke_family(self, family: str) -> None:
        async with self._w.begin() as conn:
            await conn.execute(
                update(refresh_tokens).where(refresh_tokens.c.family == family).values(revoked=True)
            )

    async def revoke_jti(self, jti: str, expires_at: float) -> None:
        async with self._w.begin() as conn:
            exists = (
                await conn.execute(select(revoked_jtis.c.jti).where(revoked_jtis.c.jti == jti))
            ).first()
            if not exists:
                await conn.execute(insert(revoked_jtis).values(jti=jti, expires_at=expires_at))

    async def jti_revoked(self, jti: str) -> bool:
        async with self.engine.connect() as conn:
            return (
                await conn.execute(select(revoked_jtis.c.jti).where(revoked_jtis.c.jti == jti))
            ).first() is not None

    async def revoke_session_tokens(self, session_id: str) -> None:
        async with self._w.begin() as conn:
            await conn.execute(
                update(refresh_tokens)
                .where(refresh_tokens.c.session_id == session_id)
                .values(revoked=True)
            )

    # --- consents (OIDC Core §3.1.2.4; remembered per client and scope, revocable)
    async def consented_scopes(self, account_id: str, client_id: str) -> set[str]:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(consents.c.scopes)
                    .where(consents.c.account_id == account_id)
                    .where(consents.c.client_id == client_id)
                )
            ).first()
        return set(row[0]) if row else set()

    async def grant_consent(self, account_id: str, client_id: str, scopes: set[str]) -> None:
        async with self._w.begin() as conn:
            row = (
                await conn.execute(
                    select(consents.c.scopes)
                    .where(consents.c.account_id == account_id)
                    .where(consents.c.client_id == client_id)
                )
            ).first()
            merged = sorted(scopes | set(row[0] if row else ()))
            if row:
                await conn.execute(
                    update(consents)
                    .where(consents.c.account_id == account_id)
                    .where(consents.c.client_id == client_id)
                    .values(scopes=merged, granted_at=time.time())
                )
            else:
                await conn.execute(
                    insert(consents).values(
                        account_id=account_id,
                        client_id=client_id,
                        scopes=merged,
                        granted_at=time.time(),
                    )
                )

    async def consents_of(self, account_id: str) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(consents)
                    .where(consents.c.account_id == account_id)
                    .order_by(consents.c.client_id)
                )
            ).mappings()
            return [dict(r) for r in rows]

    async def revoke_consent(self, account_id: str, client_id: str) -> None:
        async with self._w.begin() as conn:
            await conn.execute(
                delete(consents)
                .where(consents.c.account_id == account_id)
                .where(consents.c.client_id == client_id)
            )
            await conn.execute(
                update(refresh_tokens)
                .where(refresh_tokens.c.account_id == account_id)
                .where(refresh_tokens.c.client_id == client_id)
                .values(revoked=True)
            )
