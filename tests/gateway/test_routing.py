import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.routing import CompiledRoute, MethodNotAllowed, RoutingConflict, RoutingTable


def route(name: str, path: str, *, exact: bool = False, methods=None, host=None, svc="svc"):
    return CompiledRoute(
        service=svc,
        name=name,
        host=host,
        path=path,
        exact=exact,
        methods=frozenset(methods) if methods else None,
    )


def match_name(table: RoutingTable, path: str, method: str = "GET", host: str = "x") -> str | None:
    found = table.match(host, path, method)
    return found.name if isinstance(found, CompiledRoute) else None


def test_longest_prefix_wins() -> None:
    table = RoutingTable([route("root", "/"), route("bus", "/bus"), route("v2", "/bus/v2")])
    assert match_name(table, "/bus/v2/stops") == "v2"
    assert match_name(table, "/bus/v1/stops") == "bus"
    assert match_name(table, "/other") == "root"


def test_prefixes_match_whole_segments_only() -> None:
    table = RoutingTable([route("bus", "/bus")])
    assert match_name(table, "/bus") == "bus"
    assert match_name(table, "/bus/") == "bus"
    assert match_name(table, "/busy") is None


def test_exact_path_beats_prefix() -> None:
    table = RoutingTable([route("prefix", "/bus"), route("exact", "/bus/status", exact=True)])
    assert match_name(table, "/bus/status") == "exact"
    assert match_name(table, "/bus/status/x") == "prefix"


def test_method_specific_route_beats_catch_all_on_same_path() -> None:
    table = RoutingTable([route("any", "/bus"), route("post", "/bus", methods=["POST"])])
    assert match_name(table, "/bus/x", "POST") == "post"
    assert match_name(table, "/bus/x", "GET") == "any"


def test_other_method_only_gives_405_with_allow() -> None:
    table = RoutingTable([route("read", "/bus", methods=["GET", "HEAD"])])
    found = table.match("x", "/bus/1", "DELETE")
    assert isinstance(found, MethodNotAllowed)
    assert found.allowed == "GET, HEAD"


def test_method_mismatch_falls_through_to_shorter_prefix() -> None:
    table = RoutingTable([route("root", "/"), route("read", "/bus", methods=["GET"])])
    assert match_name(table, "/bus/1", "POST") == "root"


def test_host_specific_routes_win_and_wildcards_match_subdomains() -> None:
    table = RoutingTable(
        [
            route("any", "/"),
            route("exact", "/", host="api.city.example"),
            route("wild", "/", host="*.city.example"),
        ]
    )
    assert match_name(table, "/x", host="api.city.example:8080") == "exact"
    assert match_name(table, "/x", host="bus.city.example") == "wild"
    assert match_name(table, "/x", host="deep.bus.city.example") == "wild"
    assert match_name(table, "/x", host="city.example") == "any"


def test_no_route_is_none() -> None:
    assert RoutingTable([route("bus", "/bus")]).match("x", "/trains", "GET") is None


def test_conflicting_routes_are_refused_with_both_names() -> None:
    with pytest.raises(RoutingConflict, match=r"a/one.*b/two"):
        RoutingTable([route("one", "/bus", svc="a"), route("two", "/bus", svc="b")])
    with pytest.raises(RoutingConflict):
        RoutingTable(
            [route("one", "/bus", methods=["GET"]), route("two", "/bus", methods=["GET", "PUT"])]
        )
    # Disjoint methods on one path are fine.
    RoutingTable([route("one", "/bus", methods=["GET"]), route("two", "/bus", methods=["PUT"])])


def test_strip_prefix_keeps_a_leading_slash() -> None:
    r = route("bus", "/bus")
    r.strip_prefix = True
    assert r.upstream_path("/bus/stops/1") == "/stops/1"
    assert r.upstream_path("/bus") == "/"
    root = route("root", "/")
    root.strip_prefix = True
    assert root.upstream_path("/x") == "/x"


def test_lookup_cost_does_not_depend_on_table_size() -> None:
    many = RoutingTable([route(f"r{i}", f"/svc{i}/api") for i in range(10_000)])
    assert match_name(many, "/svc9999/api/items/1") == "r9999"
    assert match_name(many, "/svc5000/api") == "r5000"


# The documented priority, written as plainly as possible: the table must agree with it.
def reference_match(routes: list[CompiledRoute], host: str, path: str, method: str) -> object:
    name = host.lower().rsplit(":", 1)[0]
    classes: list[str | None] = [name]
    classes += sorted(
        {r.host for r in routes if r.host and r.host.startswith("*.")},
        key=len,
        reverse=True,
    )
    classes.append(None)
    allowed: set[str] = set()
    for cls in classes:
        if cls is not None and cls.startswith("*."):
            if not name.endswith(cls[1:]):
                continue
            mine = [r for r in routes if r.host == cls]
        elif cls is None:
            mine = [r for r in routes if r.host is None]
        else:
            mine = [r for r in routes if r.host == cls]
        prefixes = sorted(
            {
                (False, r.path)
                for r in mine
                if not r.exact
                and (r.path == "/" or path == r.path or path.startswith(r.path + "/"))
            },
            key=lambda k: len(k[1]),
            reverse=True,
        )
        for exact, key in [(True, path), *prefixes]:
            here = [r for r in mine if r.exact == exact and r.path == key]
            for r in here:
                if r.methods and method in r.methods:
                    return r.name
            for r in here:
                if r.methods is None:
                    return r.name
            for r in here:
                allowed |= r.methods or set()
    return ", ".join(sorted(allowed)) if allowed else None


_SEGMENTS = st.sampled_from(["a", "b", "ab"])
_PATHS = st.lists(_SEGMENTS, max_size=3).map(lambda s: "/" + "/".join(s))
_ROUTES = st.lists(
    st.tuples(
        _PATHS,
        st.booleans(),
        st.none() | st.sets(st.sampled_from(["GET", "POST", "PUT"]), min_size=1),
        st.sampled_from([None, None, "a.example", "*.example", "*.a.example"]),
    ),
    max_size=8,
)
_REQUESTS = st.tuples(
    st.sampled_from(["a.example", "B.A.Example:8080", "x.b.a.example", "other"]),
    st.lists(_SEGMENTS, max_size=4).map(lambda s: "/" + "/".join(s))
    | _PATHS.map(lambda p: p + "/"),
    st.sampled_from(["GET", "POST", "DELETE"]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(_ROUTES, st.lists(_REQUESTS, min_size=1, max_size=10))
def test_table_agrees_with_the_documented_priority(specs: list, requests: list) -> None:
    routes = [route(f"r{i}", p, exact=e, methods=m, host=h) for i, (p, e, m, h) in enumerate(specs)]
    try:
        table = RoutingTable(routes)
    except RoutingConflict:
        assume(False)
    for host, path, method in requests:
        found = table.match(host, path, method)
        if isinstance(found, MethodNotAllowed):
            got: object = found.allowed
        else:
            got = found.name if found is not None else None
        assert got == reference_match(routes, host, path, method), (host, path, method)
