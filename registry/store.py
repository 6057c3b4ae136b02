"""The service store: every change is one transaction that bumps the global revision, writes
the service, appends a change (for watchers) and an audit row — or writes nothing at all.

Instances (`registry.membership`) write through the same ledger: `record` and the writer lock.

Writers lock the single revision row first (`SELECT … FOR UPDATE` on PostgreSQL, `BEGIN
IMMEDIATE` on SQLite), so revisions are handed out in commit order: once a reader sees
revision N committed, every revision below N is committed too. Watchers rely on that to read
"changes after my last revision" without ever missing one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cityplane.schema import CityService
from registry import lifecycle
from registry.auth import Principal
from registry.bodies import stored_form
from registry.engine import is_postgresql, writer
from registry.errors import conflict
from registry.instances import effective, healthy_instances, instance_policy, utc
from registry.models import audit, changes, instances, revision, services
from registry.ownership import CREATE, DELETE, FULL, LIFECYCLE, REPLACE, Authority

NOTIFY_CHANNEL = "cityplane_registry"
ADDED, MODIFIED, DELETED = "ADDED", "MODIFIED", "DELETED"
_CHANGE_TYPE = {"create": ADDED, "update": MODIFIED, "lifecycle": MODIFIED, "delete": DELETED}


def served(document: dict[str, Any], resource_version: int) -> dict[str, Any]:
    """A stored document as clients see it: with `metadata.resourceVersion`."""
    metadata = {**document["metadata"], "resourceVersion": str(resource_version)}
    return {**document, "metadata": metadata}


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
    # For DELETED, the service as it was (read only for streams that filter by visibility).
    deleted: dict[str, Any] | None = None

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
            return await read_head(conn)

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
            head = await read_head(conn)
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
            head = await read_head(conn)
            rows = (await conn.execute(query.order_by(services.c.name))).all()
            healthy: dict[str, list[Row[Any]]] = {}
            for row in (await conn.execute(healthy_query)).all():
                healthy.setdefault(row.service, []).append(row)
        return head, [
            served(effective(r.document, healthy.get(r.name, [])), r.resource_version) for r in rows
        ]

    async def changes_after(
        self, after: int, limit: int = 1000, *, with_deleted: bool = False
    ) -> list[Change]:
        """The kept changes after `after`; `with_deleted` adds each deleted service as it was
        (from its audit row) for streams that must not show other owners' drafts."""
        columns = [changes, audit.c.before] if with_deleted else [changes]
        query = select(*columns).where(changes.c.revision > after)
        if with_deleted:
            query = query.outerjoin(audit, audit.c.revision == changes.c.revision)
        query = query.order_by(changes.c.revision).limit(limit)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [
            Change(
                r.revision,
                r.type,
                r.name,
                r.document,
                utc(r.at),
                r.before if with_deleted and r.type == DELETED else None,
            )
            for r in rows
        ]

    async def audit(self, *, service: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        query = select(audit).order_by(audit.c.revision.desc()).limit(limit)
        if service is not None:
            query = query.where(audit.c.service == service)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_audit_entry(r) for r in rows]

    # --- writes ---------------------------------------------------------------------------

    async def create(self, service: CityService, *, authority: Authority = FULL) -> Written:
        name = service.metadata.name
        wanted = versions_wanted(service.metadata.resourceVersion, None)
        proposed = stored_form(service)

        def decide(current: Current | None, now: datetime) -> Intent:
            if current is not None:  # one namespace: a taken name is taken, whoever owns it
                raise conflict(f"service {name!r} already exists; use PUT to replace it")
            document = authority.admit(CREATE, name, None, proposed)
            _check_versions(name, current, wanted)
            lifecycle.check_update(None, service, now)
            return Intent("create", document)

        return await self._write(name, authority.principal, decide)

    async def put(
        self,
        name: str,
        service: CityService,
        *,
        authority: Authority = FULL,
        if_match: str | None = None,
    ) -> Written:
        wanted = versions_wanted(service.metadata.resourceVersion, if_match)
        proposed = stored_form(service)

        def decide(current: Current | None, now: datetime) -> Intent | None:
            # Ownership first: a 409 on a version would tell a stranger the service exists.
            document = authority.admit(
                REPLACE, name, current.document if current else None, proposed
            )
            _check_versions(name, current, wanted)
            if current is not None and current.document == document:
                return None  # identical: no new revision, no audit row
            lifecycle.check_update(current.service() if current else None, service, now)
            return Intent("update" if current else "create", document)

        return await self._write(name, authority.principal, decide)

    async def delete(
        self, name: str, *, authority: Authority = FULL, if_match: str | None = None
    ) -> Written:
        wanted = versions_wanted(None, if_match)

        def decide(current: Current | None, _now: datetime) -> Intent:
            authority.admit(DELETE, name, current.document if current else None)
            _check_versions(name, current, wanted)
            return Intent("delete", None)

        return await self._write(name, authority.principal, decide)

    async def transition(
        self,
        name: str,
        request: lifecycle.TransitionRequest,
        *,
        authority: Authority = FULL,
        if_match: str | None = None,
    ) -> Written:
        wanted = versions_wanted(None, if_match)

        def decide(current: Current | None, now: datetime) -> Intent:
            authority.admit(LIFECYCLE, name, current.document if current else None)
            assert current is not None  # admit answers 404 for a missing service
            _check_versions(name, current, wanted)
            return Intent("lifecycle", lifecycle.transition(current.document, request, now))

        return await self._write(name, authority.principal, decide)

    async def _write(self, name: str, actor: Principal, decide: Decide) -> Written:
        async with self.writing():
            return await self._write_locked(name, actor, decide)

    async def _write_locked(self, name: str, actor: Principal, decide: Decide) -> Written:
        now = datetime.now(UTC)
        async with self.transaction() as conn:
            head = await read_head(conn, lock=True)
            row = (await conn.execute(select(services).where(services.c.name == name))).first()
            current = current_of(row)
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
                routed = effective(after, await healthy_instances(conn, name))
            change = (_CHANGE_TYPE[intent.action], routed)
            await self.record(conn, rev, name, change, actor, intent.action, before, after, now)
        self.committed(rev)
        document = after if after is not None else before
        assert document is not None
        return Written(document, rev, created=current is None)

    # --- the ledger (shared with registry.membership) ------------------------------------------

    def writing(self) -> asyncio.Lock | contextlib.nullcontext[None]:
        """Held around every write transaction (SQLite: one writer at a time, FIFO)."""
        return self._one_writer

    def transaction(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]:
        """A write transaction (SQLite: BEGIN IMMEDIATE)."""
        return self._writer.begin()

    def reading(self) -> AsyncConnection:
        """A connection whose transaction is one consistent view (see __init__)."""
        return self._snapshot_reader.connect()

    def committed(self, rev: int) -> None:
        self._on_commit(rev)

    async def record(
        self,
        conn: AsyncConnection,
        rev: int,
        name: str,
        change: tuple[str, dict[str, Any] | None],
        actor: Principal,
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
                actor=actor.name,
                client_id=actor.client_id,
                org=actor.organization,
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


async def read_head(conn: AsyncConnection, *, lock: bool = False) -> int:
    query = select(revision.c.value).where(revision.c.id == 1)
    if lock:
        query = query.with_for_update()  # a no-op on SQLite, where BEGIN IMMEDIATE already locks
    return int((await conn.execute(query)).scalar_one())


def current_of(row: Row[Any] | None) -> Current | None:
    if row is None:
        return None
    return Current(row.document, row.resource_version, utc(row.created_at))


def _audit_entry(row: Row[Any]) -> dict[str, Any]:
    return {
        "revision": row.revision,
        "at": utc(row.at).isoformat().replace("+00:00", "Z"),
        "actor": row.actor,
        "clientId": row.client_id,
        "org": row.org,
        "action": row.action,
        "service": row.service,
        "before": row.before,
        "after": row.after,
    }
