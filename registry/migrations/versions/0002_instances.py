"""Instances that register themselves with a TTL heartbeat.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("service", sa.String(63), primary_key=True),
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("weight", sa.Integer(), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("healthy", sa.Boolean(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("instances")
