"""The hub's data access: accounts, organizations, clients, sessions, codes, refresh tokens,
consents. Async SQLAlchemy Core; every write is one short transaction."""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from cityplane.storage import writer
from identity.clients import ClientSpec, HubClient, digest, new_secret
from identity.models import (
    accounts,
    authorization_codes,
    clients,
    consents,
    federated_identities,
    memberships,
    organizations,
    passkeys,
    refresh_tokens,
    revoked_jtis,
    sessions,
)


@dataclass(slots=True)
class Account:
    id: str
    username: str
    display_name: str
    email: str | None = None
    phone: str | None = None
    locale: str | None = None
    password_hash: str | None = None
    totp_secret: str | None = None
    totp_last_step: int | None = None
    real_name: str | None = None
    resident_id_masked: str | None = None
    resident_fingerprint: str | None = None
    real_name_verified_at: float | None = None
    created_at: float = 0.0
    organizations: list[Membership] = field(default_factory=list)

    def get_user_id(self) -> str:  # authlib's user protocol
        return self.id


@dataclass(frozen=True, slots=True)
class Membership:
    org_id: str
    org_name: str
    roles: tuple[str, ...]


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


class DuplicateError(Exception):
    """A unique value (username, real-name identity, client id) is taken."""


def _account(row: Any) -> Account:
    data = dict(row)
    return Account(**data)


class IdentityStore:
    def __init__(self, engine: AsyncEngine, *, client_cache_ttl: float = 5.0) -> None:
        self.engine = engine
        self._w = writer(engine)
        # Clients are read on every token request and change rarely: a short TTL cache keeps the
        # database off the client-credentials hot path; admin writes on this replica drop it.
        self._client_ttl = client_cache_ttl
        self._client_cache: dict[str, tuple[float, HubClient | None]] = {}
        self._account_cache: dict[str, tuple[float, Account | None]] = {}

    # --- accounts
    async def create_account(
        self,
        username: str,
        display_name: str,
        *,
        password_hash: str | None = None,
        phone: str | None = None,
        email: str | None = None,
        account_id: str | None = None,
    ) -> Account:
        new_id = account_id or uuid.uuid4().hex
        values = {
            "id": new_id,
            "username": username,
            "display_name": display_name,
            "password_hash": password_hash,
            "phone": phone,
            "email": email,
            "created_at": time.time(),
        }
        try:
            async with self._w.begin() as conn:
                await conn.execute(insert(accounts).values(**values))
        except IntegrityError:
            raise DuplicateError(f"username {username!r} is taken") from None
        found = await self.account(new_id)
        assert found is not None
        return found

    async def account(self, account_id: str) -> Account | None:
        return await self._account_where(accounts.c.id == account_id)

    async def account_cached(self, account_id: str) -> Account | None:
        """`account()` through a short TTL cache: the token endpoint reads the same accounts over
        and over (refresh grants). Changes on this replica drop the entry at once."""
        now = time.monotonic()
        cached = self._account_cache.get(account_id)
        if cached is not None and now - cached[0] < self._client_ttl:
            return cached[1]
        found = await self.account(account_id)
        if len(self._account_cache) > 10_000:
            self._account_cache.clear()
        self._account_cache[account_id] = (now, found)
        return found

    async def account_by_username(self, username: str) -> Account | None:
        return await self._account_where(accounts.c.username == username)

    async def _account_where(self, clause: Any) -> Account | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(accounts).where(clause))).mappings().first()
            if row is None:
                return None
            account = _account(row)
            rows = await conn.execute(
                select(memberships.c.org_id, organizations.c.name, memberships.c.roles)
                .join(organizations, organizations.c.id == memberships.c.org_id)
                .where(memberships.c.account_id == account.id)
                .order_by(memberships.c.org_id)
            )
            account.organizations = [Membership(o, n, tuple(r)) for o, n, r in rows]
        return account

    async def update_account(self, account_id: str, **values: Any) -> None:
        self._account_cache.pop(account_id, None)
        try:
            async with self._w.begin() as conn:
                await conn.execute(
                    update(accounts).where(accounts.c.id == account_id).values(**values)
                )
        except IntegrityError:
            raise DuplicateError("this identity is already linked to another account") from None

    async def claim_totp_step(self, account_id: str, step: int) -> bool:
        """Record `step` as used unless a later or equal one was (RFC 6238 §5.2: no replay)."""
        async with self._w.begin() as conn:
            result = await conn.execute(
                update(accounts)
                .where(accounts.c.id == account_id)
                .where((accounts.c.totp_last_step.is_(None)) | (accounts.c.totp_last_step < step))
                .values(totp_last_step=step)
            )
        return bool(result.rowcount)

    # --- federated identities
    async def federated_account(self, issuer: str, subject: str) -> str | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(federated_identities.c.account_id)
                    .where(federated_identities.c.issuer == issuer)
                    .where(federated_identities.c.subject == subject)
                )
            ).first()
        return None if row is None else str(row[0])

    async def link_federated(
        self, issuer: str, subject: str, *, username: str, display_name: str
    ) -> str:
        """The account linked to (issuer, subject), created on first sign-in."""
        found = await self.federated_account(issuer, subject)
        if found is not None:
            return found
        account = await self.create_account(username, display_name)
        try:
            async with self._w.begin() as conn:
                await conn.execute(
                    insert(federated_identities).values(
                        issuer=issuer,
                        subject=subject,
                        account_id=account.id,
                        created_at=time.time(),
                    )
                )
        except IntegrityError:  # a concurrent first sign-in won; use its account
            async with self._w.begin() as conn:
                await conn.execute(delete(accounts).where(accounts.c.id == account.id))
            found = await self.federated_account(issuer, subject)
            assert found is not None
            return found
        return account.id

    # --- organizations
    async def create_organization(self, org_id: str, name: str) -> None:
        async with self._w.begin() as conn:
            await conn.execute(
                insert(organizations).values(id=org_id, name=name, created_at=time.time())
            )

    async def organization_exists(self, org_id: str) -> bool:
        async with self.engine.connect() as conn:
            query = select(organizations.c.id).where(organizations.c.id == org_id)
            return (await conn.execute(query)).first() is not None

    async def add_member(self, org_id: str, account_id: str, roles: list[str]) -> None:
        async with self._w.begin() as conn:
            await conn.execute(
                insert(memberships).values(org_id=org_id, account_id=account_id, roles=roles)
            )

    # --- passkeys
    async def add_passkey(
        self, account_id: str, credential_id: bytes, record: dict[str, Any]
    ) -> None:
        async with self._w.begin() as conn:
            await conn.execute(
                insert(passkeys).values(
                    credential_id=credential_id,
                    account_id=account_id,
                    record=record,
                    created_at=time.time(),
                )
            )

    async def passkey(self, credential_id: bytes) -> tuple[str, dict[str, Any]] | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(passkeys.c.account_id, passkeys.c.record).where(
                        passkeys.c.credential_id == credential_id
                    )
                )
            ).first()
        return None if row is None else (row[0], dict(row[1]))

    async def passkeys_of(self, account_id: str) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(passkeys.c.record).where(passkeys.c.account_id == account_id)
            )
            return [dict(r[0]) for r in rows]

    async def update_passkey(self, credential_id: bytes, record: dict[str, Any]) -> None:
        async with self._w.begin() as conn:
            await conn.execute(
                update(passkeys)
                .where(passkeys.c.credential_id == credential_id)
                .values(record=record)
            )

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

    # --- sessions
    async def create_session(
        self, *, lifetime: float, user_agent: str | None, ip: str | None
    ) -> Session:
        now = time.time()
        # The CSRF token is born with the session, so every page rendered from it carries one.
        state: dict[str, Any] = {"csrf": secrets.token_urlsafe(24)}
        session = Session(
            secrets.token_urlsafe(32), None, state, now, now, now + lifetime, user_agent, ip
        )
        async with self._w.begin() as conn:
            await conn.execute(
                insert(sessions).values(
                    id=session.id,
                    account_id=None,
                    state=state,
                    created_at=now,
                    seen_at=now,
                    expires_at=session.expires_at,
                    user_agent=(user_agent or "")[:256],
                    ip=ip,
                )
            )
        return session

    async def session(self, session_id: str) -> Session | None:
        async with self.engine.connect() as conn:
            row = (
                (await conn.execute(select(sessions).where(sessions.c.id == session_id)))
                .mappings()
                .first()
            )
        if row is None or row["expires_at"] <= time.time():
            return None
        return Session(**{**row, "state": dict(row["state"])})

    async def save_session(self, session: Session) -> None:
        session.seen_at = time.time()
        async with self._w.begin() as conn:
            await conn.execute(
                update(sessions)
                .where(sessions.c.id == session.id)
                .values(account_id=session.account_id, state=session.state, seen_at=session.seen_at)
            )

    async def end_session(self, session_id: str) -> None:
        async with self._w.begin() as conn:
            await conn.execute(delete(sessions).where(sessions.c.id == session_id))

    async def sessions_of(self, account_id: str) -> list[Session]:
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

    # --- authorization codes and refresh tokens (rows written after Authlib's grant ran)
    async def write(self, statements: list[Any]) -> bool:
        """Run the grant's writes in one transaction. Conditional updates (a code or a refresh
        token marked used) that match no row mean a concurrent use won: roll back, say False."""
        async with self._w.begin() as conn:
            for statement, must_match in statements:
                result = await conn.execute(statement)
                if must_match and not result.rowcount:
                    await conn.rollback()
                    return False
        return True

    async def code(self, code_digest: str) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            row = (
                (
                    await conn.execute(
                        select(authorization_codes).where(
                            authorization_codes.c.digest == code_digest
                        )
                    )
                )
                .mappings()
                .first()
            )
        return None if row is None else dict(row)

    async def refresh_token(self, token_digest: str) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            row = (
                (
                    await conn.execute(
                        select(refresh_tokens).where(refresh_tokens.c.digest == token_digest)
                    )
                )
                .mappings()
                .first()
            )
        return None if row is None else dict(row)

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
