"""The immutable routing table: compiled once per config, swapped atomically, read per request.

Priority, in order (documented in docs/routing.md):
1. host: an exact host beats a wildcard host (``*.city.example``, longest suffix first), which
   beats routes without a host;
2. path: an exact ``path`` beats any ``pathPrefix``; among prefixes the longest wins. Prefixes
   match whole segments: ``/bus`` matches ``/bus`` and ``/bus/stops`` but not ``/busy``;
3. method: a route that lists the request's method beats a route without ``methods``.
A path that matches only routes for other methods answers ``405`` with ``Allow``.

Lookup cost does not grow with the number of routes: a dict probe for the first path segment,
then one per candidate prefix within it (see ``_PathTable``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.forwarding import UPSTREAM_RESPONSE_DROP
from gateway.h1server import encode_fields
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
    # ``response_headers`` on the wire, and the upstream response fields not relayed: those
    # the gateway sets itself on this route (X-Request-Id, these, the policies' own).
    response_block: bytes = field(init=False)
    response_drop: frozenset[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.route_id = f"{self.service}/{self.name}"
        self.response_block = encode_fields(list(self.response_headers))
        names = {n for n, _ in self.response_headers}
        for policy in self.policies:
            names.update(getattr(policy, "response_fields", ()))
        self.response_drop = UPSTREAM_RESPONSE_DROP | {n.lower().encode("latin-1") for n in names}

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


class _Choice:
    """The routes of one path key, by method: what a lookup needs and nothing more.

    Routes on one key never share a method (``_PathTable.add`` refuses that), so a dict from
    method to route plus the one catch-all route is the same as scanning the routes in order.
    """

    __slots__ = ("allowed", "any_method", "by_method")

    def __init__(self, routes: list[CompiledRoute]) -> None:
        self.by_method: dict[str, CompiledRoute] = {}
        self.any_method: CompiledRoute | None = None
        allowed: list[str] = []
        for route in routes:
            if route.methods is None:
                self.any_method = route
            else:
                allowed.extend(route.methods)
                for method in route.methods:
                    self.by_method[method] = route
        self.allowed = tuple(allowed)  # for 405's Allow when no route here takes the method


class _Namespace:
    """The exact paths and prefixes under one first segment (``/svc-12`` of ``/svc-12/v1/…``)."""

    __slots__ = ("exact", "first", "longest", "prefix")

    def __init__(self, first: str) -> None:
        self.first = len(first)
        self.exact: dict[str, _Choice] = {}
        self.prefix: dict[str, _Choice] = {}
        self.longest = 0  # no prefix here is longer: longer candidates need no probe

    def match(self, path: str, method: str, allowed: list[str]) -> CompiledRoute | None:
        choice = self.exact.get(path)
        if choice is not None:
            found = choice.by_method.get(method) or choice.any_method
            if found is not None:
                return found
            allowed.extend(choice.allowed)
        if not self.longest:
            return None
        probe = path
        if len(path) > self.longest:
            # Candidates end before a "/" or at the end of the path; the first that can exist
            # ends at the last "/" within the longest prefix (never before the first segment).
            probe = path[: path.rfind("/", 0, self.longest + 1)]
        prefixes = self.prefix
        first = self.first
        while True:
            choice = prefixes.get(probe)
            if choice is not None:
                found = choice.by_method.get(method) or choice.any_method
                if found is not None:
                    return found
                allowed.extend(choice.allowed)
            if len(probe) <= first:
                return None
            probe = probe[: probe.rfind("/")]


class _PathTable:
    """Exact paths and prefixes of one host class.

    Keyed by the first path segment, then one dict probe per candidate prefix: with 10,000
    routes a probe into one big dict is likely a cache miss, while the namespace of one
    service is small, and stays in cache when that service is busy (docs/perf.md).
    """

    __slots__ = ("_namespaces", "_root", "exact", "prefix")

    def __init__(self) -> None:
        self.exact: dict[str, list[CompiledRoute]] = {}
        self.prefix: dict[str, list[CompiledRoute]] = {}
        self._namespaces: dict[str, _Namespace] = {}
        self._root: _Choice | None = None  # pathPrefix "/"

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

    def freeze(self) -> None:
        """Build the lookup form once every route is in."""
        spaces = self._namespaces
        for path, routes in self.exact.items():
            space = spaces.get(first := _first_segment(path)) or spaces.setdefault(
                first, _Namespace(first)
            )
            space.exact[path] = _Choice(routes)
        for path, routes in self.prefix.items():
            if path == "/":
                self._root = _Choice(routes)
                continue
            space = spaces.get(first := _first_segment(path)) or spaces.setdefault(
                first, _Namespace(first)
            )
            space.prefix[path] = _Choice(routes)
            space.longest = max(space.longest, len(path))

    def match(self, path: str, method: str, allowed: list[str]) -> CompiledRoute | None:
        cut = path.find("/", 1)
        space = self._namespaces.get(path if cut < 0 else path[:cut])
        if space is not None and (found := space.match(path, method, allowed)):
            return found
        root = self._root
        if root is not None:
            found = root.by_method.get(method) or root.any_method
            if found is not None:
                return found
            allowed.extend(root.allowed)
        return None


def _first_segment(path: str) -> str:
    cut = path.find("/", 1)
    return path if cut < 0 else path[:cut]


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
        for table in (self._any_host, *self._exact_hosts.values(), *self._wildcards.values()):
            table.freeze()

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
