"""The service store: every change is one transaction that bumps the global revision, writes
the service, appends a change (for watchers) and an audit row — or writes nothing at all.

Writers lock the single revision row first (`SELECT … FOR UPDATE` on PostgreSQL, `BEGIN
IMMEDIATE` on SQLite), so revisions are handed out in commit order: once a reader sees
revision N committed, every revision below N is committed too. Watchers rely on that to read
"changes after my last revision" without ever missing one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Row, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cityplane.problem import Problem
from cityplane.schema import CityService, InstancePolicy
from registry import lifecycle
from registry.bodies import stored_form
from registry.engine import is_postgresql, writer
from registry.errors import conflict, instance_not_found, instances_not_enabled, not_found
from registry.models import audit, changes, instances, revision, services

NOTIFY_CHANNEL = "cityplane_registry"
ADDED, MODIFIED, DELETED = "ADDED", "MODIFIED", "DELETED"
_CHANGE_TYPE = {"create": ADDED, "update": MODIFIED, "lifecycle": MODIFIED, "delete": DELETED}


def served(document: dict[str, Any], resource_version: int) -> dict[str, Any]:
    """A stored document as clients see it: with `metadata.resourceVersion`."""
    metadata = {**document["metadata"], "resourceVersion": str(resource_version)}
    return {**document, "metadata": metadata}


def instance_policy(document: dict[str, Any] | None) -> InstancePolicy | None:
    """`spec.upstream.instances` of a stored document, or None when instances may not register."""
    if document is None:
        return None
    raw = document["spec"]["upstream"].get("instances")
    return None if raw is None else InstancePolicy.model_validate(raw)


def effective(document: dict[str, Any], healthy: Sequence[Row[Any]]) -> dict[str, Any]:
    """What gateways route to: the stored targets plus the healthy registered instances."""
    upstream = document["spec"]["upstream"]
    if "instances" not in upstream:
        return document
    targets = [*upstream.get("targets", []), *({"url": r.url, "weight": r.weight} for r in healthy)]
    spec = {**document["spec"], "upstream": {**upstream, "targets": targets}}
    return {**document, "spec": spec}


def instance_view(row: Row[Any]) -> dict[str, Any]:
    return {
        "id": row.id,
        "url": row.url,
        "weight": row.weight,
        "healthy": bool(row.healthy),
        "lastSeen": _utc(row.last_seen).isoformat().replace("+00:00", "Z"),
    }


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything we write is UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Current:
    """A service as the write transaction found it."""

    document: dict[str, Any]
    resource_version: int
    created_at: datetime

    def served(self) -> dict[str, Any]:
        return served(self.document, self.resource_version)

    def service(self) -> CityService:
        return CityService.model_validate(self.document)


@dataclass(frozen=True, slots=True)
class Intent:
    action: str  # create | update | lifecycle | delete
    document: dict[str, Any] | None  # the new stored form; None deletes


@dataclass(frozen=True, slots=True)
class Written:
    document: dict[str, Any]  # as served after the change (as it was, for a delete)
    revision: int  # of this change; the current one when nothing changed
    created: bool = False
    changed: bool = True


@dataclass(frozen=True, slots=True)
class Change:
    revision: int
    type: str
    name: str
    document: dict[str, Any] | None
    at: datetime

    def event(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "type": self.type,
            "name": self.name,
            "service": self.document,
        }


Decide = Callable[[Current | None, datetime], Intent | None]


def versions_wanted(body_version: str | None, if_match: str | None) -> list[str]:
    """resourceVersions the client requires: from the document and from `If-Match`."""
    wanted = [body_version] if body_version is not None else []
    if if_match is not None:
        for tag in if_match.split(","):
            tag = tag.strip().removeprefix("W/").strip('"')
            if tag:
                wanted.append(tag)
    return wanted


def _check_versions(name: str, current: Current | None, wanted: Sequence[str]) -> None:
    if not wanted:
        return
    if current is None:
        raise conflict(f"service {name!r} does not exist; resourceVersion cannot match")
    have = str(current.resource_version)
    for version in wanted:
        if version not in ("*", have):
            raise conflict(
                f"resourceVersion {version} does not match the current {have}; "
                "read the service again and retry"
            )


class ServiceStore:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        changes_kept: int = 10_000,
        on_commit: Callable[[int], None] | None = None,
    ) -> None:
        if changes_kept < 1:
            raise ValueError("changes_kept must be at least 1")
        self._engine = engine
        self._writer = writer(engine)
        # One consistent view for (revision, services): PostgreSQL's default READ COMMITTED
        # would take a new snapshot per statement; SQLite's read transaction already is one.
        self._snapshot_reader = (
            engine.execution_options(isolation_level="REPEATABLE READ")
            if is_postgresql(engine)
            else engine
        )
        self._notify = is_postgresql(engine)
        # SQLite has one writer at a time anyway; queueing writers here (FIFO, no polling)
        # instead of in SQLite's busy handler (sleeps of up to 100 ms) keeps a burst of
        # writes from stalling. PostgreSQL writers queue on the revision row lock instead.
        self._one_writer: asyncio.Lock | contextlib.nullcontext[None] = (
            contextlib.nullcontext() if self._notify else asyncio.Lock()
        )
        self.changes_kept = changes_kept
        self._on_commit = on_commit or (lambda _revision: None)

    # --- reads ----------------------------------------------------------------------------

    async def revision(self) -> int:
        async with self._engine.connect() as conn:
            return await _head(conn)

    async def get(self, name: str) -> dict[str, Any] | None:
        query = select(services.c.document, services.c.resource_version).where(
            services.c.name == name
        )
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return served(row.document, row.resource_version) if row else None

    async def find(
        self,
        *,
        lifecycle: str | None = None,
        owner: str | None = None,
        labels: Iterable[tuple[str, str]] = (),
    ) -> tuple[int, list[dict[str, Any]]]:
        query = select(services.c.document, services.c.resource_version, services.c.labels)
        if lifecycle is not None:
            query = query.where(services.c.lifecycle == lifecycle)
        if owner is not None:
            query = query.where(services.c.owner == owner)
        wanted = list(labels)
        async with self._snapshot_reader.connect() as conn, conn.begin():
            head = await _head(conn)
            rows = (await conn.execute(query.order_by(services.c.name))).all()
        # Label selectors are matched here rather than in SQL: JSON path syntax differs between
        # the two databases and label keys may contain '.' and '/'.
        return head, [
            served(r.document, r.resource_version)
            for r in rows
            if all(r.labels.get(k) == v for k, v in wanted)
        ]

    async def snapshot(self) -> tuple[int, list[dict[str, Any]]]:
        """Every service as gateways route it: stored targets plus healthy instances."""
        query = select(services.c.document, services.c.resource_version, services.c.name)
        healthy_query = (
            select(instances)
            .where(instances.c.healthy.is_(True))
            .order_by(instances.c.service, instances.c.registered_at, instances.c.id)
        )
        async with self._snapshot_reader.connect() as conn, conn.begin():
            head = await _head(conn)
            rows = (await conn.execute(query.order_by(services.c.name))).all()
            healthy: dict[str, list[Row[Any]]] = {}
            for row in (await conn.execute(healthy_query)).all():
                healthy.setdefault(row.service, []).append(row)
        return head, [
            served(effective(r.document, healthy.get(r.name, [])), r.resource_version) for r in rows
        ]

    async def instances(self, name: str) -> list[dict[str, Any]]:
        async with self._snapshot_reader.connect() as conn, conn.begin():
            document = (
                await conn.execute(select(services.c.document).where(services.c.name == name))
            ).scalar_one_or_none()
            if document is None:
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

    async def changes_after(self, after: int, limit: int = 1000) -> list[Change]:
        query = (
            select(changes)
            .where(changes.c.revision > after)
            .order_by(changes.c.revision)
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [Change(r.revision, r.type, r.name, r.document, _utc(r.at)) for r in rows]

    async def audit(self, *, service: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        query = select(audit).order_by(audit.c.revision.desc()).limit(limit)
        if service is not None:
            query = query.where(audit.c.service == service)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_audit_entry(r) for r in rows]

    # --- writes ---------------------------------------------------------------------------

    async def create(self, service: CityService, *, actor: str) -> Written:
        name = service.metadata.name
        wanted = versions_wanted(service.metadata.resourceVersion, None)
        document = stored_form(service)

        def decide(current: Current | None, now: datetime) -> Intent:
            if current is not None:
                raise conflict(f"service {name!r} already exists; use PUT to replace it")
            _check_versions(name, current, wanted)
            lifecycle.check_update(None, service, now)
            return Intent("create", document)

        return await self._write(name, actor, decide)

    async def put(
        self, name: str, service: CityService, *, actor: str, if_match: str | None = None
    ) -> Written:
        wanted = versions_wanted(service.metadata.resourceVersion, if_match)
        document = stored_form(service)

        def decide(current: Current | None, now: datetime) -> Intent | None:
            _check_versions(name, current, wanted)
            if current is not None and current.document == document:
                return None  # identical: no new revision, no audit row
            lifecycle.check_update(current.service() if current else None, service, now)
            return Intent("update" if current else "create", document)

        return await self._write(name, actor, decide)

    async def delete(self, name: str, *, actor: str, if_match: str | None = None) -> Written:
        wanted = versions_wanted(None, if_match)

        def decide(current: Current | None, _now: datetime) -> Intent:
            if current is None:
                raise not_found(name)
            _check_versions(name, current, wanted)
            return Intent("delete", None)

        return await self._write(name, actor, decide)

    async def transition(
        self,
        name: str,
        request: lifecycle.TransitionRequest,
        *,
        actor: str,
        if_match: str | None = None,
    ) -> Written:
        wanted = versions_wanted(None, if_match)

        def decide(current: Current | None, now: datetime) -> Intent:
            if current is None:
                raise not_found(name)
            _check_versions(name, current, wanted)
            return Intent("lifecycle", lifecycle.transition(current.document, request, now))

        return await self._write(name, actor, decide)

    async def _write(self, name: str, actor: str, decide: Decide) -> Written:
        async with self._one_writer:
            return await self._write_locked(name, actor, decide)

    async def _write_locked(self, name: str, actor: str, decide: Decide) -> Written:
        now = datetime.now(UTC)
        async with self._writer.begin() as conn:
            head = await _head(conn, lock=True)
            row = (await conn.execute(select(services).where(services.c.name == name))).first()
            current = _current(row)
            intent = decide(current, now)  # may raise a Problem: the transaction rolls back
            if intent is None:
                assert current is not None
                return Written(current.served(), head, changed=False)
            rev = head + 1
            after = served(intent.document, rev) if intent.document is not None else None
            before = current.served() if current is not None else None
            await self._write_service(conn, name, intent.document, rev, current, now)
            routed = after
            if instance_policy(intent.document) is None:
                # Deleted, or instances no longer allowed: registered instances go with it.
                await conn.execute(delete(instances).where(instances.c.service == name))
            elif after is not None:
                routed = effective(after, await _healthy(conn, name))
            change = (_CHANGE_TYPE[intent.action], routed)
            await self._record(conn, rev, name, change, actor, intent.action, before, after, now)
        self._on_commit(rev)
        document = after if after is not None else before
        assert document is not None
        return Written(document, rev, created=current is None)

    async def _record(
        self,
        conn: AsyncConnection,
        rev: int,
        name: str,
        change: tuple[str, dict[str, Any] | None],
        actor: str,
        action: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
        now: datetime,
    ) -> None:
        """Bump the revision to `rev`, append the change (for watchers) and the audit row."""
        change_type, routed = change
        await conn.execute(update(revision).where(revision.c.id == 1).values(value=rev))
        await conn.execute(
            insert(changes).values(
                revision=rev, name=name, type=change_type, document=routed, at=now
            )
        )
        await conn.execute(
            insert(audit).values(
                revision=rev,
                at=now,
                actor=actor,
                action=action,
                service=name,
                before=before,
                after=after,
            )
        )
        if rev > self.changes_kept:
            await conn.execute(delete(changes).where(changes.c.revision <= rev - self.changes_kept))
        if self._notify:
            # Delivered by PostgreSQL at commit, to every replica's LISTEN connection.
            await conn.execute(select(func.pg_notify(NOTIFY_CHANNEL, str(rev))))

    # --- instances --------------------------------------------------------------------------

    async def register(
        self, name: str, instance: str, url: str, weight: int
    ) -> tuple[dict[str, Any], int, bool]:
        """Register or heartbeat one instance: (instance, revision, created). A heartbeat that
        changes nothing only moves `last_seen` (no revision, no change)."""
        key = (instances.c.service == name) & (instances.c.id == instance)
        async with self._one_writer:
            now = datetime.now(UTC)
            # The common case first, without the revision lock: a healthy instance, as it was.
            async with self._writer.begin() as conn:
                seen = await conn.execute(
                    update(instances)
                    .where(key, instances.c.healthy.is_(True))
                    .where(instances.c.url == url, instances.c.weight == weight)
                    .values(last_seen=now)
                )
                if seen.rowcount == 1:
                    row = (await conn.execute(select(instances).where(key))).one()
                    return instance_view(row), await _head(conn), False
            created = False
            view: dict[str, Any] = {}

            async def mutate(conn: AsyncConnection, _policy: InstancePolicy) -> bool:
                nonlocal created, view
                row = (await conn.execute(select(instances).where(key))).first()
                if row is None:
                    created = True
                    await conn.execute(
                        insert(instances).values(
                            service=name,
                            id=instance,
                            url=url,
                            weight=weight,
                            registered_at=now,
                            last_seen=now,
                            healthy=True,
                        )
                    )
                else:
                    await conn.execute(
                        update(instances)
                        .where(key)
                        .values(url=url, weight=weight, last_seen=now, healthy=True)
                    )
                view = instance_view((await conn.execute(select(instances).where(key))).one())
                return row is None or not row.healthy or row.url != url or row.weight != weight

            rev, _ = await self._membership_locked(
                name, instance, now, mutate, lambda: "register" if created else "heartbeat"
            )
            return view, rev, created

    async def deregister(self, name: str, instance: str) -> int:
        key = (instances.c.service == name) & (instances.c.id == instance)

        async def mutate(conn: AsyncConnection, _policy: InstancePolicy) -> bool:
            if (await conn.execute(delete(instances).where(key))).rowcount != 1:
                raise instance_not_found(name, instance)
            return True

        async with self._one_writer:
            now = datetime.now(UTC)
            rev, _ = await self._membership_locked(
                name, instance, now, mutate, lambda: "deregister"
            )
            return rev

    async def reap(self) -> int:
        """Mark instances that missed their TTL unhealthy, remove those past `removeAfter`.
        Safe on every replica: each update is conditional, so only one of them changes a row
        (and bumps the revision). Returns the number of instances changed here."""
        now = datetime.now(UTC)
        async with self._engine.connect() as conn:
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
            age = (now - _utc(row.last_seen)).total_seconds()
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
        key = (instances.c.service == name) & (instances.c.id == instance)
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

        async with self._one_writer:
            _, changed = await self._membership_locked(name, instance, now, mutate, lambda: what)
        return changed

    async def _membership_locked(
        self,
        name: str,
        instance: str,
        now: datetime,
        mutate: Callable[[AsyncConnection, InstancePolicy], Awaitable[bool]],
        action: Callable[[], str],
    ) -> tuple[int, bool]:
        """One instance change of `name` in one transaction; when `mutate` says the
        membership changed: a new revision, a MODIFIED change with the effective document and
        an audit row (actor `instance:<id>`). Returns the revision (the current one if not)."""
        async with self._writer.begin() as conn:
            head = await _head(conn, lock=True)
            row = (await conn.execute(select(services).where(services.c.name == name))).first()
            current = _current(row)
            if current is None:
                raise not_found(name)
            policy = instance_policy(current.document)
            if policy is None:
                raise instances_not_enabled(name)
            before = await _healthy(conn, name)
            if not await mutate(conn, policy):
                return head, False
            after = await _healthy(conn, name)
            rev = head + 1
            rv = current.resource_version
            routed_before = served(effective(current.document, before), rv)
            routed_after = served(effective(current.document, after), rv)
            await self._record(
                conn,
                rev,
                name,
                (MODIFIED, routed_after),
                f"instance:{instance}",
                action(),
                routed_before,
                routed_after,
                now,
            )
        self._on_commit(rev)
        return rev, True

    @staticmethod
    async def _write_service(
        conn: AsyncConnection,
        name: str,
        document: dict[str, Any] | None,
        rev: int,
        current: Current | None,
        now: datetime,
    ) -> None:
        if document is None:
            await conn.execute(delete(services).where(services.c.name == name))
            return
        spec = document["spec"]
        values = {
            "document": document,
            "resource_version": rev,
            "lifecycle": spec.get("lifecycle", "published"),
            "owner": spec.get("owner"),
            "labels": document["metadata"].get("labels", {}),
            "updated_at": now,
        }
        if current is None:
            await conn.execute(insert(services).values(name=name, created_at=now, **values))
        else:
            await conn.execute(update(services).where(services.c.name == name).values(**values))


async def _head(conn: AsyncConnection, *, lock: bool = False) -> int:
    query = select(revision.c.value).where(revision.c.id == 1)
    if lock:
        query = query.with_for_update()  # a no-op on SQLite, where BEGIN IMMEDIATE already locks
    return int((await conn.execute(query)).scalar_one())


async def _healthy(conn: AsyncConnection, name: str) -> list[Row[Any]]:
    query = (
        select(instances)
        .where(instances.c.service == name, instances.c.healthy.is_(True))
        .order_by(instances.c.registered_at, instances.c.id)
    )
    return list((await conn.execute(query)).all())


def _current(row: Row[Any] | None) -> Current | None:
    if row is None:
        return None
    return Current(row.document, row.resource_version, _utc(row.created_at))


def _audit_entry(row: Row[Any]) -> dict[str, Any]:
    return {
        "revision": row.revision,
        "at": _utc(row.at).isoformat().replace("+00:00", "Z"),
        "actor": row.actor,
        "action": row.action,
        "service": row.service,
        "before": row.before,
        "after": row.after,
    }
