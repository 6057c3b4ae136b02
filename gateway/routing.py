"""The immutable routing table: compiled once per config, swapped atomically, read per request.

Priority, in order (documented in docs/routing.md):
1. host: an exact host beats a wildcard host (``*.city.example``, longest suffix first), which
   beats routes without a host;
2. path: an exact ``path`` beats any ``pathPrefix``; among prefixes the longest wins. Prefixes
   match whole segments: ``/bus`` matches ``/bus`` and ``/bus/stops`` but not ``/busy``;
3. method: a route that lists the request's method beats a route without ``methods``.
A path that matches only routes for other methods answers ``405`` with ``Allow``.

Lookup cost does not grow with the number of routes: one dict probe per path segment.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.policies.base import Policy


@dataclass(slots=True, eq=False)
class CompiledRoute:
    service: str
    name: str
    host: str | None
    path: str  # exact path, or prefix without trailing slash ("/" for the root)
    exact: bool
    methods: frozenset[str] | None
    strip_prefix: bool = False
    lifecycle: str = "published"
    policies: tuple[Policy, ...] = ()
    cluster: Any = None  # gateway.upstream.cluster.UpstreamCluster
    response_headers: tuple[tuple[str, str], ...] = ()
    route_id: str = field(init=False)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.route_id = f"{self.service}/{self.name}"

    def upstream_path(self, path: str) -> str:
        """The path sent upstream: the normalized request path, minus the prefix if asked."""
        if not self.strip_prefix:
            return path
        if self.exact:
            return "/"
        rest = path[len(self.path) :] if self.path != "/" else path
        return rest if rest.startswith("/") else "/" + rest


class MethodNotAllowed:
    __slots__ = ("allowed",)

    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = ", ".join(sorted(set(allowed)))


class RoutingConflict(ValueError):
    pass


def prefix_key(prefix: str) -> str:
    return prefix.rstrip("/") or "/"


class _PathTable:
    __slots__ = ("exact", "prefix")

    def __init__(self) -> None:
        self.exact: dict[str, list[CompiledRoute]] = {}
        self.prefix: dict[str, list[CompiledRoute]] = {}

    def add(self, route: CompiledRoute) -> None:
        bucket = (self.exact if route.exact else self.prefix).setdefault(route.path, [])
        for other in bucket:
            if other.methods is None or route.methods is None:
                overlap = other.methods is route.methods
            else:
                overlap = bool(other.methods & route.methods)
            if overlap:
                where = f"host {route.host!r}, " if route.host else ""
                kind = "path" if route.exact else "pathPrefix"
                raise RoutingConflict(
                    f"routes {other.route_id!r} and {route.route_id!r} both match "
                    f"{where}{kind} {route.path!r} for the same methods"
                )
        bucket.append(route)
        # Method-specific routes first: they win over catch-all ones on the same path.
        bucket.sort(key=lambda r: r.methods is None)

    def match(self, path: str, method: str, allowed: list[str]) -> CompiledRoute | None:
        cands = self.exact.get(path)
        if cands and (found := _by_method(cands, method, allowed)):
            return found
        prefixes = self.prefix
        if not prefixes:
            return None
        probe = path
        while True:
            cands = prefixes.get(probe)
            if cands and (found := _by_method(cands, method, allowed)):
                return found
            if probe == "/":
                return None
            cut = probe.rfind("/")
            probe = probe[:cut] if cut > 0 else "/"


def _by_method(cands: list[CompiledRoute], method: str, allowed: list[str]) -> CompiledRoute | None:
    for route in cands:
        methods = route.methods
        if methods is None or method in methods:
            return route
        allowed.extend(methods)
    return None


class RoutingTable:
    """Maps (host, normalized path, method) to a compiled route. Immutable once built."""

    __slots__ = ("_any_host", "_exact_hosts", "_wildcards", "revision", "routes")

    def __init__(self, routes: Iterable[CompiledRoute], revision: int = 0) -> None:
        self.routes: tuple[CompiledRoute, ...] = tuple(routes)
        self.revision = revision
        self._exact_hosts: dict[str, _PathTable] = {}
        self._wildcards: dict[str, _PathTable] = {}  # ".city.example" -> table
        self._any_host = _PathTable()
        for route in self.routes:
            self._table_for(route.host).add(route)

    def _table_for(self, host: str | None) -> _PathTable:
        if host is None:
            return self._any_host
        if host.startswith("*."):
            return self._wildcards.setdefault(host[1:], _PathTable())
        return self._exact_hosts.setdefault(host, _PathTable())

    def match(self, host: str, path: str, method: str) -> CompiledRoute | MethodNotAllowed | None:
        allowed: list[str] = []
        if self._exact_hosts or self._wildcards:
            name = _host_name(host)
            table = self._exact_hosts.get(name)
            if table and (found := table.match(path, method, allowed)):
                return found
            if self._wildcards:
                dot = name.find(".")
                while dot >= 0:
                    table = self._wildcards.get(name[dot:])
                    if table and (found := table.match(path, method, allowed)):
                        return found
                    dot = name.find(".", dot + 1)
        found = self._any_host.match(path, method, allowed)
        if found:
            return found
        return MethodNotAllowed(allowed) if allowed else None

    def __len__(self) -> int:
        return len(self.routes)


def _host_name(host: str) -> str:
    """Lower-case host without port; IPv6 literals keep their brackets."""
    host = host.lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    colon = host.rfind(":")
    return host[:colon] if colon >= 0 else host
