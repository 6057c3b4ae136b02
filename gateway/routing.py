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
from typing import Any

from gateway.forwarding import UPSTREAM_RESPONSE_DROP
from gateway.h1server import encode_fields
from gateway.policies.base import Policy
from gateway.upstream.heads import drop_table


class CompiledRoute:
    """One route of the table, with everything a request on it needs, computed once.

    A plain slotted class, not a dataclass: the compiled form makes it an extension type
    (ADR 16), so the request path reads its fields as C struct fields (ADR 17).
    """

    __slots__ = (
        "cluster",
        "exact",
        "host",
        "lifecycle",
        "methods",
        "name",
        "path",
        "policies",
        "response_block",
        "response_drop",
        "response_drop_table",
        "response_headers",
        "route_id",
        "service",
        "strip_prefix",
    )

    def __init__(
        self,
        service: str,
        name: str,
        host: str | None,
        path: str,  # exact path, or prefix without trailing slash ("/" for the root)
        exact: bool,
        methods: frozenset[str] | None,
        strip_prefix: bool = False,
        lifecycle: str = "published",
        policies: tuple[Policy, ...] = (),
        cluster: Any = None,  # gateway.upstream.cluster.UpstreamCluster
        response_headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.service = service
        self.name = name
        self.host = host
        self.path = path
        self.exact = exact
        self.methods = methods
        self.strip_prefix = strip_prefix
        self.lifecycle = lifecycle
        self.policies = policies
        self.cluster = cluster
        self.response_headers = response_headers
        self.route_id = f"{service}/{name}"
        # ``response_headers`` on the wire, and the upstream response fields not relayed: those
        # the gateway sets itself on this route (X-Request-Id, these, the policies' own).
        self.response_block = encode_fields(list(response_headers))
        names = {n for n, _ in response_headers}
        for policy in policies:
            names.update(getattr(policy, "response_fields", ()))
        self.response_drop: frozenset[bytes] = UPSTREAM_RESPONSE_DROP | {
            n.lower().encode("latin-1") for n in names
        }
        self.response_drop_table = drop_table(self.response_drop)

    def __repr__(self) -> str:
        return (
            f"CompiledRoute({self.route_id!r}, host={self.host!r}, path={self.path!r}, "
            f"exact={self.exact!r}, methods={sorted(self.methods) if self.methods else None!r})"
        )

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
    """The routes of one path key, by method (the ``pathPrefix: /`` routes of a table).

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


_NONE: dict[str, CompiledRoute] = {}

# The key of the routes without ``methods`` in ``_PathTable``'s by-method dicts.
_ANY = ""


class _PathTable:
    """Exact paths and prefixes of one host class.

    The lookup form (``freeze``) is flat: per method (and ``_ANY`` for routes without
    ``methods``), one dict from exact path to route and one from prefix to route, holding every
    service's paths. A lookup probes those shared dicts, whose hash tables stay in cache because
    every request uses them; what is cold per request is the key it hits and the route. Nested
    per-service objects cost a cache miss each when requests spread over 1,000 services
    (docs/perf.md, Routing at scale). ``_longest`` maps a first path segment to the longest
    prefix under it, so a probe starts there and a path under no known segment costs one probe.
    """

    __slots__ = ("_exact", "_longest", "_prefix", "_root", "exact", "prefix")

    def __init__(self) -> None:
        self.exact: dict[str, list[CompiledRoute]] = {}
        self.prefix: dict[str, list[CompiledRoute]] = {}
        self._longest: dict[str, int] = {}
        self._exact: dict[str, dict[str, CompiledRoute]] = {}
        self._prefix: dict[str, dict[str, CompiledRoute]] = {}
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
        longest = self._longest
        for path, routes in self.exact.items():
            longest.setdefault(_first_segment(path), 0)
            _index(self._exact, path, routes)
        for path, routes in self.prefix.items():
            if path == "/":
                self._root = _Choice(routes)
                continue
            first = _first_segment(path)
            longest[first] = max(longest.get(first, 0), len(path))
            _index(self._prefix, path, routes)

    def match(self, path: str, method: str, allowed: list[str]) -> CompiledRoute | None:
        # ``str(path)`` is ``path`` itself for a str; in the compiled form the result is known
        # to be a str, so ``find``, slices and ``len`` are direct C calls, not method lookups.
        # Dicts are read with ``in`` and ``[]`` for the same reason (no ``.get`` lookup).
        p = str(path)
        cut = p.find("/", 1)
        if cut < 0:
            cut = len(p)
        first = p[:cut]
        if first in self._longest:
            longest = self._longest[first]
            exact = self._exact
            if method in exact and p in (table := exact[method]):
                return table[p]
            if _ANY in exact and p in (table := exact[_ANY]):
                return table[p]
            if longest:
                probe = p
                if len(p) > longest:
                    # Candidates end before a "/" or at the end of the path; the first that can
                    # exist ends at the last "/" within the longest prefix (never before the
                    # first segment).
                    probe = p[: p.rfind("/", 0, longest + 1)]
                prefixes = self._prefix
                by_method = prefixes.get(method, _NONE)
                any_method = prefixes.get(_ANY, _NONE)
                while True:
                    if probe in by_method:
                        return by_method[probe]
                    if probe in any_method:
                        return any_method[probe]
                    if len(probe) <= cut:
                        break
                    probe = probe[: probe.rfind("/")]
            self._allowed(p, method, longest, cut, allowed)
        root = self._root
        if root is not None:
            found = root.by_method.get(method) or root.any_method
            if found is not None:
                return found
            allowed.extend(root.allowed)
        return None

    def _allowed(self, path: str, method: str, longest: int, first: int, into: list[str]) -> None:
        """The methods of the keys that match ``path`` (for 405's Allow); only after a miss."""
        for other, table in self._exact.items():
            if other and other != method and path in table:
                into.append(other)
        if not longest:
            return
        probe = path
        if len(path) > longest:
            probe = path[: path.rfind("/", 0, longest + 1)]
        while True:
            for other, table in self._prefix.items():
                if other and other != method and probe in table:
                    into.append(other)
            if len(probe) <= first:
                return
            probe = probe[: probe.rfind("/")]


def _index(
    into: dict[str, dict[str, CompiledRoute]], path: str, routes: list[CompiledRoute]
) -> None:
    for route in routes:
        for method in route.methods or (_ANY,):
            into.setdefault(method, {})[path] = route


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
        self._any_host: _PathTable = _PathTable()  # typed: match() is a C call (ADR 18)
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
        exact_hosts = self._exact_hosts
        wildcards = self._wildcards
        if exact_hosts or wildcards:
            name = str(_host_name(host))  # a str to the compiled form: see _PathTable.match
            if name in exact_hosts:
                table: _PathTable = exact_hosts[name]
                if found := table.match(path, method, allowed):
                    return found
            if wildcards:
                dot = name.find(".")
                while dot >= 0:
                    suffix = name[dot:]
                    if suffix in wildcards:
                        table = wildcards[suffix]
                        if found := table.match(path, method, allowed):
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
    name = str(host).lower()
    if name.startswith("["):
        end = name.find("]")
        return name[: end + 1] if end > 0 else name
    colon = name.rfind(":")
    return name[:colon] if colon >= 0 else name
