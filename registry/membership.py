"""Instances on the registry's ledger: register, heartbeat, deregister, and the reaper that
expires and removes the silent ones (docs/registry-api.md, "Instances").

Each membership change is one transaction on the service store's ledger: a new revision, a
MODIFIED change carrying the routed document, and an audit row (actor `instance:<id>`, with the
client and organization of the token that made it). A heartbeat that changes nothing only moves
`last_seen`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from cityplane.problem import Problem
from cityplane.schema import InstancePolicy
from registry.auth import Principal
from registry.errors import instance_not_found, instances_not_enabled, not_found
from registry.instances import (
    effective,
    healthy_instances,
    instance_policy,
    instance_view,
    utc,
)
from registry.models import instances, services
from registry.ownership import FULL, INSTANCES, Authority
from registry.store import MODIFIED, ServiceStore, current_of, read_head, served

Mutate = Callable[[AsyncConnection, InstancePolicy], Awaitable[bool]]


def _key(name: str, instance: str) -> Any:
    return (instances.c.service == name) & (instances.c.id == instance)


class InstanceStore:
    """The instances of every service, written through `store`'s ledger."""

    def __init__(self, store: ServiceStore) -> None:
        self._store = store

    async def list(self, name: str, *, authority: Authority = FULL) -> list[dict[str, Any]]:
        async with self._store.reading() as conn, conn.begin():
            document = (
                await conn.execute(select(services.c.document).where(services.c.name == name))
            ).scalar_one_or_none()
            if document is None or not authority.sees(document):
                raise not_found(name)
            if instance_policy(document) is None:
                raise instances_not_enabled(name)
            rows = (
                await conn.execute(
                    select(instances)
                    .where(instances.c.service == name)
                    .order_by(instances.c.registered_at, instances.c.id)
                )
            ).all()
        return [instance_view(r) for r in rows]

    async def register(
        self, name: str, instance: str, url: str, weight: int, *, authority: Authority = FULL
    ) -> tuple[dict[str, Any], int, bool]:
        """Register or heartbeat one instance: (instance, revision, created). A heartbeat that
        changes nothing only moves `last_seen` (no revision, no change)."""
        key = _key(name, instance)
        async with self._store.writing():
            now = datetime.now(UTC)
            # The common case first, without the revision lock: a healthy instance, as it was.
            async with self._store.transaction() as conn:
                document = (
                    await conn.execute(select(services.c.document).where(services.c.name == name))
                ).scalar_one_or_none()
                authority.admit(INSTANCES, name, document)
                seen = await conn.execute(
                    update(instances)
                    .where(key, instances.c.healthy.is_(True))
                    .where(instances.c.url == url, instances.c.weight == weight)
                    .values(last_seen=now)
                )
                if seen.rowcount == 1:
                    row = (await conn.execute(select(instances).where(key))).one()
                    return instance_view(row), await read_head(conn), False
            created = False
            view: dict[str, Any] = {}

            async def mutate(conn: AsyncConnection, _policy: InstancePolicy) -> bool:
                nonlocal created, view
                row = (await conn.execute(select(instances).where(key))).first()
                values = {"url": url, "weight": weight, "last_seen": now, "healthy": True}
                if row is None:
                    created = True
                    await conn.execute(
                        insert(instances).values(
                            service=name, id=instance, registered_at=now, **values
                        )
                    )
                else:
                    await conn.execute(update(instances).where(key).values(**values))
                view = instance_view((await conn.execute(select(instances).where(key))).one())
                return row is None or not row.healthy or row.url != url or row.weight != weight

            rev, _ = await self._membership_locked(
                name,
                instance,
                now,
                mutate,
                lambda: "register" if created else "heartbeat",
                authority,
            )
            return view, rev, created

    async def deregister(self, name: str, instance: str, *, authority: Authority = FULL) -> int:
        key = _key(name, instance)

        async def mutate(conn: AsyncConnection, _policy: InstancePolicy) -> bool:
            if (await conn.execute(delete(instances).where(key))).rowcount != 1:
                raise instance_not_found(name, instance)
            return True

        async with self._store.writing():
            now = datetime.now(UTC)
            rev, _ = await self._membership_locked(
                name, instance, now, mutate, lambda: "deregister", authority
            )
            return rev

    async def reap(self) -> int:
        """Mark instances that missed their TTL unhealthy, remove those past `removeAfter`.
        Safe on every replica: each update is conditional, so only one of them changes a row
        (and bumps the revision). Returns the number of instances changed here."""
        now = datetime.now(UTC)
        async with self._store.reading() as conn:
            rows = (await conn.execute(select(instances))).all()
            if not rows:
                return 0
            names = sorted({r.service for r in rows})
            documents = dict(
                (
                    await conn.execute(
                        select(services.c.name, services.c.document).where(
                            services.c.name.in_(names)
                        )
                    )
                ).all()
            )
        due = []
        for row in rows:
            policy = instance_policy(documents.get(row.service))
            if policy is None:
                continue
            age = (now - utc(row.last_seen)).total_seconds()
            if age > policy.removeAfter or (row.healthy and age > policy.ttl):
                due.append((row.service, row.id))
        changed = 0
        for name, instance in due:
            try:
                changed += await self._reap_one(name, instance, now)
            except Problem:
                continue  # the service went away or stopped taking instances meanwhile
        return changed

    async def _reap_one(self, name: str, instance: str, now: datetime) -> bool:
        key = _key(name, instance)
        what = "expire"

        async def mutate(conn: AsyncConnection, policy: InstancePolicy) -> bool:
            nonlocal what
            # Conditional: a heartbeat (or another replica's reaper) that came first wins.
            removed = await conn.execute(
                delete(instances).where(
                    key, instances.c.last_seen < now - timedelta(seconds=policy.removeAfter)
                )
            )
            if removed.rowcount == 1:
                what = "remove"
                return True
            expired = await conn.execute(
                update(instances)
                .where(key, instances.c.healthy.is_(True))
                .where(instances.c.last_seen < now - timedelta(seconds=policy.ttl))
                .values(healthy=False)
            )
            return bool(expired.rowcount == 1)

        async with self._store.writing():
            _, changed = await self._membership_locked(
                name, instance, now, mutate, lambda: what, FULL
            )
        return changed

    async def _membership_locked(
        self,
        name: str,
        instance: str,
        now: datetime,
        mutate: Mutate,
        action: Callable[[], str],
        authority: Authority,
    ) -> tuple[int, bool]:
        """One instance change of `name` in one transaction; when `mutate` says the
        membership changed: a new revision, a MODIFIED change with the effective document and
        an audit row. Returns the revision (the current one if nothing changed)."""
        async with self._store.transaction() as conn:
            head = await read_head(conn, lock=True)
            row = (await conn.execute(select(services).where(services.c.name == name))).first()
            current = current_of(row)
            # Checked again under the lock: the owner may have changed since the fast path.
            authority.admit(INSTANCES, name, current.document if current else None)
            assert current is not None  # admit answers 404 for a missing service
            policy = instance_policy(current.document)
            if policy is None:
                raise instances_not_enabled(name)
            before = await healthy_instances(conn, name)
            if not await mutate(conn, policy):
                return head, False
            after = await healthy_instances(conn, name)
            rev = head + 1
            rv = current.resource_version
            routed_before = served(effective(current.document, before), rv)
            routed_after = served(effective(current.document, after), rv)
            actor: Principal = dataclasses.replace(authority.principal, name=f"instance:{instance}")
            await self._store.record(
                conn,
                rev,
                name,
                (MODIFIED, routed_after),
                actor,
                action(),
                routed_before,
                routed_after,
                now,
            )
        self._store.committed(rev)
        return rev, True
