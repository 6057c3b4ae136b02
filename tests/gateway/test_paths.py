import re

import pytest

from cityplane.problem import Problem
from gateway.paths import normalize_path, remove_dot_segments, split_target


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/bus/stops", "/bus/stops"),
        ("/bus/../admin", "/admin"),
        ("/bus/./stops", "/bus/stops"),
        ("//admin", "/admin"),
        ("/bus//..//admin", "/admin"),
        ("/bus/%2e%2e/admin", "/admin"),
        ("/bus/%2E%2E/admin", "/admin"),
        ("/bus/.%2e/admin", "/admin"),
        ("/%62us/stops", "/bus/stops"),
        ("/..", "/"),
        ("/../../etc/passwd", "/etc/passwd"),
        ("/bus/..", "/"),
        ("/bus/stops/.", "/bus/stops/"),
        ("/search/caf%C3%A9", "/search/caf%C3%A9"),
        ("/a%20b", "/a%20b"),
    ],
)
def test_paths_are_normalized_before_routing(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "/bus/..%2fadmin",
        "/bus/%2F..%2Fadmin",
        "/bus/%5c..%5cadmin",
        "/bus/%00",
        "/bus/\\..\\admin",
        "/bus/%zz",
        "/bus/%2",
        "/bus/..;/admin",
        "/bus/.;/admin",
        "bus/stops",
        "/bus stops",
        "/bus#frag",
    ],
)
def test_ambiguous_paths_are_refused_with_400(raw: str) -> None:
    with pytest.raises(Problem) as err:
        normalize_path(raw)
    assert err.value.status == 400


def test_remove_dot_segments_follows_rfc3986_examples() -> None:
    assert remove_dot_segments("/a/b/c/./../../g") == "/a/g"
    assert remove_dot_segments("/mid/content=5/../6") == "/mid/6"


def test_query_is_kept_byte_for_byte() -> None:
    assert split_target("/bus?x=%2e%2e&y=/../") == ("/bus", "?x=%2e%2e&y=/../")
    assert split_target("/bus") == ("/bus", "")


def test_a_path_is_refused_for_exactly_the_characters_of_the_forbidden_set() -> None:
    # normalize_path decides most paths without the regex (isprintable() and three substring
    # checks): it must refuse the same characters the regex names, and no others.
    forbidden = re.compile(r"[\x00-\x20\x7f\\#]")
    for code in [*range(0x800), 0x2028, 0x3000, 0xFEFF, 0x10FFFF]:
        char = chr(code)
        for raw in (f"/a{char}b", f"/{char}", f"/a/{char}{char}"):
            try:
                normalize_path(raw)
                refused = False
            except Problem as problem:  # '%' and dot segments have refusals of their own
                refused = "forbidden character" in str(problem.detail)
            assert refused == bool(forbidden.search(raw)), (hex(code), raw)
    with pytest.raises(Problem):
        normalize_path("")
