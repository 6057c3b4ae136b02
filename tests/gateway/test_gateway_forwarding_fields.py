"""Field handling is the same however a client spells a name, the first time or the hundredth."""

from __future__ import annotations

from gateway.forwarding import TrustedProxies, upstream_headers


def forward(raw: list[tuple[bytes, bytes]], *, trusted: bool = False) -> list[tuple[str, str]]:
    return upstream_headers(
        raw, peer="10.0.0.7", peer_trusted=trusted, scheme="https", host="api.city.example"
    )


def test_every_spelling_of_a_field_name_is_treated_alike_on_every_request() -> None:
    raw = [
        (b"Accept", b"*/*"),
        (b"CONNECTION", b"X-Drop-Me"),
        (b"x-drop-me", b"1"),
        (b"X-CityPlane-Subject", b"spoofed"),
        (b"x-request-id", b"client-chosen"),
        (b"X-Forwarded-For", b"6.6.6.6"),
        (b"Keep-Alive", b"timeout=5"),
    ]
    for _ in range(3):  # names seen before take the cached path
        out = forward(raw)
        names = [n.lower() for n, _ in out]
        assert names == [
            "accept",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "forwarded",
        ]
        assert dict(out)["X-Forwarded-For"] == "10.0.0.7"  # the untrusted claim is replaced
        assert dict(out)["Forwarded"] == "for=10.0.0.7;host=api.city.example;proto=https"


def test_a_trusted_proxys_forwarding_fields_are_extended_not_replaced() -> None:
    assert TrustedProxies(["10.0.0.0/8"]).trusts("10.0.0.7")
    raw = [(b"x-forwarded-for", b"203.0.113.9"), (b"Forwarded", b"for=203.0.113.9")]
    for _ in range(2):
        out = dict(forward(raw, trusted=True))
        assert out["X-Forwarded-For"] == "203.0.113.9, 10.0.0.7"
        assert out["Forwarded"] == (
            "for=203.0.113.9, for=10.0.0.7;host=api.city.example;proto=https"
        )


def test_client_fields_go_upstream_as_the_bytes_the_client_sent() -> None:
    from gateway.forwarding import forwarded_fields
    from gateway.upstream.client import encode_request_head

    raw = [
        (b"Host", b"api.city.example"),
        (b"X-Note", b"caf\xe9 \xe4\xb8\xad"),  # obs-text: forwarded untouched, not re-encoded
        (b"Proxy", b"http://evil.example"),  # httpoxy: never forwarded
        (b"Proxy-Foo", b"1"),
        (b"Accept", b"*/*"),
    ]
    block, hop = forwarded_fields(
        raw, peer="10.0.0.7", peer_trusted=False, scheme="https", host="api.city.example"
    )
    assert block == b"X-Note: caf\xe9 \xe4\xb8\xad\r\nAccept: */*\r\n"
    assert hop == (
        b"X-Forwarded-For: 10.0.0.7\r\nX-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: api.city.example\r\n"
        b"Forwarded: for=10.0.0.7;host=api.city.example;proto=https\r\n"
    )
    head, _ = encode_request_head("GET", "/x", [("Host", "up")], None, None, block + hop)
    assert head == b"GET /x HTTP/1.1\r\nHost: up\r\n" + block + hop + b"\r\n"


def test_raw_fields_must_be_whole_lines() -> None:
    import pytest

    from gateway.upstream.client import encode_request_head

    with pytest.raises(ValueError):
        encode_request_head("GET", "/", [("Host", "up")], None, None, b"A: 1")


def test_a_value_with_cr_lf_or_nul_breaks_its_field() -> None:
    from gateway.forwarding import breaks_field

    assert not breaks_field("") and not breaks_field("caf\xe9, 10.0.0.7")
    for bad in ("a\r\nX-Injected: 1", "a\nb", "a\rb", "a\x00b"):
        assert breaks_field(bad), bad


def test_a_forwarding_block_with_cr_or_lf_is_refused_where_it_is_made() -> None:
    # Never from a request the front accepted (it refuses such values); checked all the same,
    # since the upstream head does not scan the fields again.
    import pytest

    from gateway.forwarding import forwarded_fields

    for host in ("evil\r\nX-Injected: 1", "evil\nX: 1", "a\x00b"):
        with pytest.raises(ValueError):
            forwarded_fields([], peer="10.0.0.7", peer_trusted=False, scheme="https", host=host)


async def test_a_request_with_proxy_fields_is_served_without_them(
    upstreams, gateway_factory, http
) -> None:
    from tests.conftest import service

    up = await upstreams()
    gw = await gateway_factory(
        [service("svc", [up.url], [{"name": "all", "match": {"pathPrefix": "/"}}])]
    )
    headers = {"Proxy": "http://evil.example", "Proxy-Foo": "1", "X-Kept": "yes"}
    async with http.get(gw.url + "/x", headers=headers) as resp:
        assert resp.status == 200  # a Proxy-* field used to fail the request with 500
    seen = {k.lower() for k in up.requests[-1]["headers"]}
    assert "x-kept" in seen
    assert "proxy" not in seen and "proxy-foo" not in seen


def test_each_client_gets_its_own_hop_block_from_the_cache() -> None:
    def hop_of(peer: str, raw: list[tuple[bytes, bytes]], trusted: bool = False) -> dict[str, str]:
        out = upstream_headers(
            raw, peer=peer, peer_trusted=trusted, scheme="https", host="api.city.example"
        )
        return {n: v for n, v in out if n.startswith(("X-Forwarded", "Forwarded"))}

    for round_ in range(2):  # more clients than the cache holds, twice
        for i in range(1100):
            peer = f"10.{i // 256}.{i % 256}.{round_}"
            assert hop_of(peer, [])["X-Forwarded-For"] == peer
    # A trusted proxy's X-Forwarded-Proto and X-Forwarded-Host are kept, so this hop adds
    # none: the block cached for the same peer without them must not be reused, nor the
    # other way round.
    proto, host = (b"X-Forwarded-Proto", b"http"), (b"X-Forwarded-Host", b"h")
    for _ in range(2):
        for fields in ([], [proto], [host], [proto, host]):
            hop = hop_of("192.0.2.1", fields, trusted=True)
            assert hop["X-Forwarded-Proto"] == ("http" if proto in fields else "https")
            assert hop["X-Forwarded-Host"] == ("h" if host in fields else "api.city.example")


def test_the_compiled_name_check_classifies_every_name_as_the_cache_does() -> None:
    """Compiled, `forwarded_fields` classifies a client's field name with `_known_name` (by
    length and a comparison in any ASCII case); the sources decode, lower-case and cache it
    (`_classify`). Both must agree on every known name in four spellings and near misses."""
    from gateway import forwarding as f

    assert f.IDENTITY_PREFIX == "x-cityplane-"  # written out as bytes in _known_name
    known = sorted(f.HOP_BY_HOP | f.FORWARDING | f.GATEWAY_SET | {"proxy"})
    names = [n.encode() for n in known]
    names += [b"X-CityPlane-User", b"x-cityplane-", b"X-CITYPLANE-trust-level", b"x-cityplanes"]
    names += [b"Proxy-Foo", b"proxy-", b"Proxy", b"Proxies", b"proxyx", b"X-Proxy"]
    names += [b"Accept", b"Content-Type", b"Cookie", b"X-Forwarded-Port", b"Forwarded-For"]
    names += [b"A" * 70, b"Connection" + b"x" * 60, b"t", b"TE", b"tE", b"Te-X"]
    spelled = []
    for name in names:
        spelled += [name, name.upper(), name.title(), name.swapcase()]
        spelled += [name.replace(b"-", b"\r")]  # CR with the case bit set would read as "-"
        spelled += [name[:-1], name + b"s"]
    for name in spelled:
        lname, kind = f._classify(name)
        got = f._known_name(name, f._NAME_TABLE)
        assert got[1] == kind, name
        if kind in (f._HOP, f._FORWARDING):  # the only kinds whose lower-case name is read
            assert got[0] == lname, name
