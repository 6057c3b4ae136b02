"""Query parameters that take one value: given twice or holding a NUL, they are a 400."""

from __future__ import annotations

from aiohttp import web

from registry.errors import invalid_query


def query_value(request: web.Request, key: str) -> str | None:
    """The one value of `key` (None when absent)."""
    values = request.query.getall(key, [])
    if len(values) > 1:
        raise invalid_query(f"{key} is given {len(values)} times; give it once")
    if not values:
        return None
    # Nothing stored can contain a NUL (bodies.py), and PostgreSQL refuses one in a query.
    if "\x00" in values[0]:
        raise invalid_query(f"{key}={values[0]!r}: a NUL character is not allowed")
    return values[0]
