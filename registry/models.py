"""The registry's tables (SQLAlchemy Core). Alembic migrations create them; nothing else does.

`document` columns hold the `CityService` as the client wrote it (minus
`metadata.resourceVersion`, which is the `resource_version` column). Plain `JSON`, not
PostgreSQL's `JSONB`: JSONB reorders keys, and documents should read back as they were written.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
)

metadata = MetaData()

OWNER_MAX = 253  # characters of `spec.owner` the owner column holds (a DNS-name-sized org id)

# JSON null (not SQL NULL) would make "no document" ambiguous; store SQL NULL instead.
Document = JSON(none_as_null=True)

services = Table(
    "services",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("document", Document, nullable=False),
    # The global revision of this service's last write; served as metadata.resourceVersion.
    Column("resource_version", BigInteger, nullable=False),
    Column("lifecycle", String(16), nullable=False, index=True),
    Column("owner", String(OWNER_MAX), nullable=True, index=True),
    Column("labels", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# One row (id = 1). Writers lock it first, so revisions are handed out in commit order.
revision = Table(
    "revision",
    metadata,
    Column("id", SmallInteger, primary_key=True, autoincrement=False),
    Column("value", BigInteger, nullable=False),
    CheckConstraint("id = 1", name="revision_single_row"),
)

# The last `changes_kept` changes, for watch resume; older ones are pruned in the same
# transaction that adds a change. Every revision has exactly one row until pruned.
changes = Table(
    "changes",
    metadata,
    Column("revision", BigInteger, primary_key=True, autoincrement=False),
    Column("name", String(63), nullable=False),
    Column("type", String(8), nullable=False),
    Column("document", Document, nullable=True),
    Column("at", DateTime(timezone=True), nullable=False),
)

# Append-only: nothing in the registry updates or deletes these rows.
audit = Table(
    "audit",
    metadata,
    Column("revision", BigInteger, primary_key=True, autoincrement=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("actor", String(253), nullable=False),
    # Who else stands behind `actor` (hub tokens): the token's client_id and org (0003).
    Column("client_id", String(253), nullable=True),
    Column("org", String(OWNER_MAX), nullable=True),
    Column("action", String(16), nullable=False),
    Column("service", String(63), nullable=False),
    Column("before", Document, nullable=True),
    Column("after", Document, nullable=True),
    Index("audit_service_revision", "service", "revision"),
)

# Instances that registered themselves (`spec.upstream.instances`); rows go with their service.
instances = Table(
    "instances",
    metadata,
    Column("service", String(63), primary_key=True),
    Column("id", String(128), primary_key=True),
    Column("url", String(2048), nullable=False),
    Column("weight", Integer, nullable=False),
    Column("registered_at", DateTime(timezone=True), nullable=False),
    Column("last_seen", DateTime(timezone=True), nullable=False),
    Column("healthy", Boolean, nullable=False),
)
