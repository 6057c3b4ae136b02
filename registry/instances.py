"""Instances that register themselves (`spec.upstream.instances`): the request body and id,
the service's instance policy, and what gateways route to (stored targets + healthy instances).

Pure functions and one query; the writes (register, heartbeat, deregister, reap) are
`registry.membership`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import Field
from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from cityplane.schema import InstancePolicy, Target
from registry.models import instances

INSTANCE_ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
INSTANCE_ACTIONS = ("register", "heartbeat", "deregister", "expire", "remove")


class InstanceRegistration(Target):
    """The body of `PUT /v1/services/{name}/instances/{id}`: the instance's URL and weight."""

    url: str = Field(description="Base URL of this instance, http:// or https://.")


def utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything we write is UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


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
        "lastSeen": utc(row.last_seen).isoformat().replace("+00:00", "Z"),
    }


async def healthy_instances(conn: AsyncConnection, name: str) -> list[Row[Any]]:
    """The healthy instances of `name`, oldest registration first (the routing order)."""
    query = (
        select(instances)
        .where(instances.c.service == name, instances.c.healthy.is_(True))
        .order_by(instances.c.registered_at, instances.c.id)
    )
    return list((await conn.execute(query)).all())
