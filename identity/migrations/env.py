"""Alembic environment of the identity hub: online migrations only.

`cityplane.storage.migrate` hands over an open connection in `config.attributes["connection"]`.
The hub keeps its own version table so it can share one PostgreSQL database with the registry.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from identity.models import metadata

VERSION_TABLE = "identity_alembic_version"


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        transaction_per_migration=False,
        version_table=VERSION_TABLE,
    )
    with context.begin_transaction():
        context.run_migrations()


given = context.config.attributes.get("connection")
if given is None:
    raise SystemExit(
        "identity migrations run through `cityplane identity` (they need a connection)"
    )
_run(given)
