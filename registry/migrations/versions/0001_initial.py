"""Services, the revision counter, the kept changes and the audit log.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "services",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("resource_version", sa.BigInteger(), nullable=False),
        sa.Column("lifecycle", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(253), nullable=True),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_services_lifecycle", "services", ["lifecycle"])
    op.create_index("ix_services_owner", "services", ["owner"])
    revision_table = op.create_table(
        "revision",
        sa.Column("id", sa.SmallInteger(), primary_key=True, autoincrement=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("id = 1", name="revision_single_row"),
    )
    op.bulk_insert(revision_table, [{"id": 1, "value": 0}])
    op.create_table(
        "changes",
        sa.Column("revision", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("type", sa.String(8), nullable=False),
        sa.Column("document", sa.JSON(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "audit",
        sa.Column("revision", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(253), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("service", sa.String(63), nullable=False),
        sa.Column("before", sa.JSON(), nullable=True),
        sa.Column("after", sa.JSON(), nullable=True),
    )
    op.create_index("audit_service_revision", "audit", ["service", "revision"])


def downgrade() -> None:
    op.drop_table("audit")
    op.drop_table("changes")
    op.drop_table("revision")
    op.drop_table("services")
