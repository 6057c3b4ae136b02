"""People and organizations: accounts (with their verification material), organizations and
memberships, passkeys, federated identities. The rest of the hub's data is in store.py."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from cityplane.storage import writer
from identity.models import accounts, federated_identities, memberships, organizations, passkeys


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


class DuplicateError(Exception):
    """A unique value (username, real-name identity, client id) is taken."""


def _account(row: Any) -> Account:
    data = dict(row)
    return Account(**data)


class AccountStore:
    def __init__(self, engine: AsyncEngine, *, cache_ttl: float = 5.0) -> None:
        self.engine = engine
        self._w = writer(engine)
        self._cache_ttl = cache_ttl
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
        if cached is not None and now - cached[0] < self._cache_ttl:
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

    async def put_organization(self, org_id: str, name: str) -> bool:
        """Create or rename; True when created."""
        async with self._w.begin() as conn:
            found = (
                await conn.execute(select(organizations.c.id).where(organizations.c.id == org_id))
            ).first()
            if found:
                await conn.execute(
                    update(organizations).where(organizations.c.id == org_id).values(name=name)
                )
                return False
            await conn.execute(
                insert(organizations).values(id=org_id, name=name, created_at=time.time())
            )
            return True

    async def add_member(self, org_id: str, account_id: str, roles: list[str]) -> None:
        """Add `account_id` to the organization with `roles`, or set its roles."""
        self._account_cache.pop(account_id, None)
        async with self._w.begin() as conn:
            updated = await conn.execute(
                update(memberships)
                .where(memberships.c.org_id == org_id)
                .where(memberships.c.account_id == account_id)
                .values(roles=roles)
            )
            if not updated.rowcount:
                await conn.execute(
                    insert(memberships).values(org_id=org_id, account_id=account_id, roles=roles)
                )

    async def remove_member(self, org_id: str, account_id: str) -> bool:
        self._account_cache.pop(account_id, None)
        async with self._w.begin() as conn:
            result = await conn.execute(
                delete(memberships)
                .where(memberships.c.org_id == org_id)
                .where(memberships.c.account_id == account_id)
            )
        return bool(result.rowcount)

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
