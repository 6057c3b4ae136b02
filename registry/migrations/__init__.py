"""Alembic migrations of the registry's database, shipped inside the package.

`registry.engine.migrate` runs them at start (`script_location = "registry:migrations"`).
"""
