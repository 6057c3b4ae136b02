"""Audit rows say who stands behind the actor: the hub token's client_id and org.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("audit", sa.Column("client_id", sa.String(253), nullable=True))
    op.add_column("audit", sa.Column("org", sa.String(253), nullable=True))


def downgrade() -> None:
    # Batch mode: SQLite drops columns by copying the table.
    with op.batch_alter_table("audit") as batch:
        batch.drop_column("org")
        batch.drop_column("client_id")
