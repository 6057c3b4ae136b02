"""`RequestHeaders`: the multidict subset the policies use, over the parser's raw pairs."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from gateway.h1server import RequestHeaders

RAW = [
    (b"Host", b"city.example"),
    (b"authorization", b"Bearer abc"),
    (b"X-Key", b"one"),
    (b"x-key", b"two"),
    (b"X-Caf\xe9", b"cr\xe8me"),
]


def reference() -> CIMultiDict[str]:
    return CIMultiDict((n.decode("latin-1"), v.decode("latin-1")) for n, v in RAW)


@pytest.mark.parametrize("name", ["Host", "AUTHORIZATION", "x-key", "X-Café", "Missing"])
def test_lookups_agree_with_a_case_insensitive_multidict(name: str) -> None:
    headers, ref = RequestHeaders(RAW), reference()
    assert headers.get(name) == ref.get(name)
    assert headers.get(name, "d") == ref.get(name, "d")
    assert headers.getall(name, None) == ref.getall(name, None)
    assert (name in headers) == (name in ref)
    if name in ref:
        assert headers[name] == ref[name]
    else:
        with pytest.raises(KeyError):
            headers[name]
        with pytest.raises(KeyError):
            headers.getall(name)


def test_iteration_keeps_order_and_duplicates() -> None:
    headers = RequestHeaders(RAW)
    assert list(headers) == [n.decode("latin-1") for n, _ in RAW]
    assert list(headers.items()) == [(n.decode("latin-1"), v.decode("latin-1")) for n, v in RAW]
    assert len(headers) == len(RAW)
    assert 42 not in headers


def test_the_watched_fields_are_told_apart_in_any_case_and_nothing_else_is() -> None:
    """The connection reads a few fields itself (Host, Authorization, the framing fields, …):
    compiled, `_field_kind` tells them by length and one comparison; the sources look the
    lower-cased name up. Both must agree with the table for every spelling."""
    import random

    from gateway import h1server

    rng = random.Random(5)
    names = list(h1server._WATCHED)
    for lower, kind in h1server._WATCHED.items():
        spellings = [lower, lower.upper(), lower.title()]
        spellings += [bytes(rng.choice((c, c ^ 32)) if 97 <= c <= 122 else c for c in lower)]
        for spelling in spellings:
            assert h1server._field_kind(spelling, h1server._WATCHED_BY_SIZE) == kind, spelling
    others = [b"Hosts", b"Hast", b"Content-Type", b"Content-Lengtx", b"X-Request-Ix", b"", b"-"]
    others += [n[:-1] + b"_" for n in names] + [n + b"s" for n in names]
    others += [bytes([c + 1 if 97 <= c < 122 else c for c in n]) for n in names]
    # Only A-Z are folded: CR with the case bit set would read as "-", "@" as "`".
    others += [n.replace(b"-", b"\r") for n in names if b"-" in n]
    for other in others:
        assert h1server._field_kind(other, h1server._WATCHED_BY_SIZE) == h1server._OTHER, other
