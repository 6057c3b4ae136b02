import pytest

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
