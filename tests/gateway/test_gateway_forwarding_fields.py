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
