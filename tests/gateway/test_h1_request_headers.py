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
