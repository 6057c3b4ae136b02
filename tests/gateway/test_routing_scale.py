"""10,000 routes compile and resolve by the documented rules (docs/gateway.md, issue #6).

Logic, not timing: the table's answers are checked against a plain reading of the rules (a
linear scan over every route), on generated routes that overlap on purpose: shared and nested
prefixes, exact paths under prefixes, method splits, exact and wildcard hosts. Speed is
measured by ``python -m bench.routes``; the clock here is only a sanity bound.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from cityplane.schema import CityService
from gateway.compiler import Compiler, ConfigError, PolicyContext
from gateway.policies.ratelimit_store import LocalStore
from gateway.routing import CompiledRoute, MethodNotAllowed, RoutingTable

SERVICES = 1_000
ROUTES = 10_000
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
AREAS = ["north", "south", "east", "west", "harbour"]
TOPICS = ["bus", "tram", "parking", "waste", "permits", "events"]
HOSTS = ["api.city.example", "open.city.example", "maps.north.city.example"]
WILDCARDS = ["*.city.example", "*.north.city.example"]


def _route_specs(rng: random.Random) -> list[list[dict[str, Any]]]:
    """ROUTES routes over SERVICES services; no two may match the same host, path and method."""
    taken: dict[tuple[str | None, bool, str], list[set[str] | None]] = {}
    per_service: list[list[dict[str, Any]]] = [[] for _ in range(SERVICES)]
    count = 0
    while count < ROUTES:
        s = rng.randrange(SERVICES)
        shape = rng.random()
        if shape < 0.5:  # the service's own namespace, like /svc-12/v1/items/
            parts = [f"svc-{s}", rng.choice(["v1", "v2"]), rng.choice(["items", "stops", "x"])]
        else:  # shared city paths: many services meet under /north/bus/...
            parts = [rng.choice(AREAS), rng.choice(TOPICS), f"line-{rng.randrange(40)}"]
        host = None
        if rng.random() < 0.15:
            host = rng.choice(HOSTS + WILDCARDS)
        # "/" only on a host: a catch-all for every host would leave no 404 to check.
        path = "/" + "/".join(parts[: rng.randint(0 if host else 1, 3)])
        exact = rng.random() < 0.2 and path != "/"
        methods = None if rng.random() < 0.3 else set(rng.sample(METHODS, rng.randint(1, 3)))
        key = (host, exact, path)
        others = taken.setdefault(key, [])
        if any((o is None and methods is None) or (o and methods and o & methods) for o in others):
            continue  # would be a conflict; the conflict rule has its own test below
        others.append(methods)
        match: dict[str, Any] = {"path": path} if exact else {"pathPrefix": path}
        if host:
            match["host"] = host
        if methods:
            match["methods"] = sorted(methods)
        per_service[s].append({"name": f"r{len(per_service[s])}", "match": match})
        count += 1
    return per_service


def _documents(per_service: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "cityplane.io/v1alpha1",
            "kind": "CityService",
            "metadata": {"name": f"svc-{s}"},
            "spec": {
                "upstream": {"targets": [{"url": f"http://10.1.{s // 250}.{s % 250}:8080"}]},
                "routes": routes,
            },
        }
        for s, routes in enumerate(per_service)
        if routes
    ]


def _compile(documents: list[dict[str, Any]]) -> RoutingTable:
    services = [CityService.model_validate(d) for d in documents]
    local = LocalStore()
    return Compiler(PolicyContext(local, local)).compile(services).table


@pytest.fixture(scope="module")
def city() -> tuple[RoutingTable, float]:
    documents = _documents(_route_specs(random.Random(10_000)))
    began = time.monotonic()
    table = _compile(documents)
    return table, time.monotonic() - began


# -- the rules, read plainly (docs/gateway.md "Routing priority") -------------------------------


def _covers(prefix: str, path: str) -> bool:
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


def _by_rules(
    by_host: dict[str | None, list[CompiledRoute]], host: str, path: str, method: str
) -> CompiledRoute | set[str] | None:
    """The route the rules choose, the methods for a 405, or None for a 404."""
    name = host.lower().rsplit(":", 1)[0]
    wildcards = sorted(
        (h for h in by_host if h and h.startswith("*.") and name.endswith(h[1:])),
        key=len,
        reverse=True,
    )
    allowed: set[str] = set()
    for tier_host in [name, *wildcards, None]:  # 1. host: exact, longest wildcard, none
        tier = by_host.get(tier_host, [])
        exact = [r for r in tier if r.exact and r.path == path]
        prefixes = sorted(
            {r.path for r in tier if not r.exact and _covers(r.path, path)}, key=len, reverse=True
        )
        groups = [exact] + [[r for r in tier if not r.exact and r.path == p] for p in prefixes]
        for group in groups:  # 2. path: exact, then the longest prefix first
            for route in group:  # 3. a route listing the method beats one without methods
                if route.methods is not None and method in route.methods:
                    return route
            for route in group:
                if route.methods is None:
                    return route
            for route in group:
                allowed |= route.methods or set()
    return allowed or None


def _requests(rng: random.Random, count: int) -> list[tuple[str, str, str]]:
    hosts = [*HOSTS, "a.b.city.example", "x.maps.north.city.example", "elsewhere.example"]
    requests = []
    for _ in range(count):
        if rng.random() < 0.5:
            s = rng.randrange(SERVICES)
            parts = [f"svc-{s}", rng.choice(["v1", "v2", "v3"]), rng.choice(["items", "stops"])]
        else:
            parts = [
                rng.choice([*AREAS, "downtown"]),
                rng.choice(TOPICS),
                f"line-{rng.randrange(45)}",
            ]
        parts = parts[: rng.randint(0, 3)] + [str(rng.randrange(1000))] * rng.randint(0, 2)
        host = rng.choice(hosts)
        if rng.random() < 0.2:
            host = host.upper() + ":8443"
        requests.append((host, "/" + "/".join(parts), rng.choice(METHODS)))
    return requests


def test_ten_thousand_routes_compile_within_a_generous_bound(city):
    table, took = city
    assert len(table) == ROUTES
    assert took < 10.0  # sanity only: bench/routes.py measures (≤ 1 s is the target)


def test_ten_thousand_routes_resolve_as_the_rules_say(city):
    table, _ = city
    by_host: dict[str | None, list[CompiledRoute]] = {}
    for route in table.routes:
        by_host.setdefault(route.host, []).append(route)
    outcomes = {"route": 0, "405": 0, "404": 0}
    for host, path, method in _requests(random.Random(6), 800):
        expected = _by_rules(by_host, host, path, method)
        found = table.match(host, path, method)
        where = f"{method} {host}{path}"
        if isinstance(expected, CompiledRoute):
            assert found is expected, f"{where}: {found} instead of {expected.route_id}"
            outcomes["route"] += 1
        elif expected:
            assert isinstance(found, MethodNotAllowed), f"{where}: {found} instead of 405"
            assert found.allowed == ", ".join(sorted(expected)), where
            outcomes["405"] += 1
        else:
            assert found is None, f"{where}: {found} instead of 404"
            outcomes["404"] += 1
    assert min(outcomes.values()) >= 5, outcomes  # every kind of answer was exercised


def test_priorities_hold_among_ten_thousand_routes():
    per_service = _route_specs(random.Random(7))
    per_service[0] = [
        {"name": "items", "match": {"pathPrefix": "/zz/v1/items/", "methods": ["GET"]}},
        {"name": "archive", "match": {"pathPrefix": "/zz/v1/items/archive"}},
        {"name": "one", "match": {"path": "/zz/v1/items/archive/1", "methods": ["GET"]}},
        {"name": "write", "match": {"pathPrefix": "/zz/v1/items", "methods": ["POST"]}},
        {"name": "host", "match": {"pathPrefix": "/zz/", "host": "zz.city.example"}},
        {"name": "wild", "match": {"pathPrefix": "/zz/", "host": "*.zz.city.example"}},
    ]
    table = _compile(_documents(per_service))

    def route(host: str, path: str, method: str = "GET") -> str | None:
        found = table.match(host, path, method)
        return found.name if isinstance(found, CompiledRoute) else None

    plain = "gateway.example"
    assert route(plain, "/zz/v1/items/42") == "items"
    assert route(plain, "/zz/v1/items/archive/7") == "archive"  # the longest prefix wins
    assert route(plain, "/zz/v1/items/archive/1") == "one"  # an exact path beats prefixes
    assert route(plain, "/zz/v1/items/archive/1", "DELETE") == "archive"
    assert route(plain, "/zz/v1/items/archived") == "items"  # prefixes match whole segments
    assert route(plain, "/zz/v1/items/9", "POST") == "write"  # a shorter prefix takes POST
    refused = table.match(plain, "/zz/v1/items/9", "DELETE")
    assert isinstance(refused, MethodNotAllowed)
    assert refused.allowed == "GET, POST"
    assert route("ZZ.city.example:443", "/zz/v1/items/42") == "host"  # exact host first
    assert route("a.b.zz.city.example", "/zz/v1/items/42") == "wild"  # then wildcards


def test_one_conflict_among_ten_thousand_routes_is_refused_naming_both():
    per_service = _route_specs(random.Random(8))
    per_service[0] = [{"name": "first", "match": {"pathPrefix": "/dup/", "methods": ["GET"]}}]
    per_service[999] = [
        *per_service[999],
        {"name": "second", "match": {"pathPrefix": "/dup", "methods": ["PUT", "GET"]}},
    ]
    with pytest.raises(ConfigError, match=r"svc-0/first.*svc-999/second|svc-999/second.*svc-0"):
        _compile(_documents(per_service))
