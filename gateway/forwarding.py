"""Headers between client and upstream: hop-by-hop removal, Forwarded/X-Forwarded-*, identity.

RFC 9110 §7.6.1: a proxy removes the hop-by-hop fields (and any field the Connection header
names) before forwarding. RFC 7239: `Forwarded`. Client-supplied forwarding headers are only
believed when the peer is a configured trusted proxy; otherwise they are replaced.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence

from gateway.ascii import COMPILED, name_is

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",  # re-framed by the upstream pool
        "expect",  # answered by the gateway itself
    }
)
FORWARDING = frozenset({"forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})
# Headers the gateway sets for upstreams: never accepted from a client.
IDENTITY_PREFIX = "x-cityplane-"
GATEWAY_SET = frozenset({"x-request-id", "traceparent"})

RESPONSE_DROP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "date",
        "server",
    }
)
# The same, as the lower-case bytes the upstream pool reads, plus X-Request-Id: the gateway
# always sets its own on the client's answer.
UPSTREAM_RESPONSE_DROP = frozenset(n.encode("latin-1") for n in RESPONSE_DROP | {"x-request-id"})

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """Which peers may tell us the original client (X-Forwarded-For / Forwarded)."""

    __slots__ = ("_cache", "_networks")

    def __init__(self, cidrs: Iterable[str] = ()) -> None:
        self._networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(c, strict=False) for c in cidrs
        )
        self._cache: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, peer: str) -> bool:
        if not self._networks:
            return False
        hit = self._cache.get(peer)
        if hit is None:
            try:
                addr = ipaddress.ip_address(peer)
            except ValueError:
                hit = False
            else:  # a loop, not any(<generator>): no closure keeps trusts() a C method (ADR 18)
                hit = False
                for net in self._networks:
                    if addr in net:
                        hit = True
                        break
            if len(self._cache) < 10_000:
                self._cache[peer] = hit
        return hit


def client_address(peer: str, xff: str | None, trusted: TrustedProxies) -> str:
    """The original client: walk X-Forwarded-For from the right past trusted proxies."""
    if not xff or not trusted.trusts(peer):
        return peer
    hops = [h.strip() for h in xff.split(",") if h.strip()]
    for hop in reversed(hops):
        if not trusted.trusts(hop):
            return hop
    return hops[0] if hops else peer


def _forwarded_node(addr: str) -> str:
    return f'"[{addr}]"' if ":" in addr else addr


def forwarded_fields(
    raw_headers: Sequence[tuple[bytes, bytes]],
    *,
    peer: str,
    peer_trusted: bool,
    scheme: str,
    host: str,
) -> tuple[bytes, bytes]:
    """The client's end-to-end fields, cleaned, and the forwarding fields for this hop.

    Both come back as blocks of wire lines ready for the upstream head. The client's fields
    stay the bytes llhttp accepted (it refuses CR, LF and NUL in values and non-token names):
    no decoding and re-encoding per field. This hop's fields are built from those bytes and
    the peer's address, once per distinct set of values (`_hop_block`).
    """
    connection_named: set[bytes] | None = None
    out: list[bytes] = []
    prior_xff: list[str] = []
    prior_fwd: list[str] = []
    has_proto = has_host = False
    kinds = _RAW_NAMES
    table = _NAME_TABLE
    # `out` holds each kept field as four pieces (name, ": ", value, CRLF), joined once at the
    # end: three concatenations per field were ~1,000 instructions.
    for raw_name, raw_value in raw_headers:
        if COMPILED:  # by length and one comparison in C (ADR 22): no hash of a new name
            known = _known_name(raw_name, table)
        else:  # `in` and [] are C calls compiled; .get() a call by name
            known = kinds[raw_name] if raw_name in kinds else _classify(raw_name)
        lname, kind = known
        if kind == _FORWARD:
            out += (raw_name, b": ", raw_value, b"\r\n")
            continue
        if kind == _DROP:
            continue
        if kind == _HOP:
            if lname == b"connection":
                named = {t.strip().lower() for t in raw_value.split(b",")}
                connection_named = named if connection_named is None else connection_named | named
            continue
        # kind == _FORWARDING
        if peer_trusted:
            if lname == b"x-forwarded-for":
                prior_xff.append(raw_value.decode("latin-1"))
            elif lname == b"forwarded":
                prior_fwd.append(raw_value.decode("latin-1"))
            else:
                has_proto = has_proto or lname == b"x-forwarded-proto"
                has_host = has_host or lname == b"x-forwarded-host"
                out += (raw_name, b": ", raw_value, b"\r\n")
    if connection_named:
        # RFC 9110 §7.6.1: fields the Connection field names are hop-by-hop too.
        kept: list[bytes] = []
        for i in range(0, len(out), 4):
            if out[i].lower() not in connection_named:
                kept += out[i : i + 4]
        out = kept
        if b"x-forwarded-proto" in connection_named:
            has_proto = False
        if b"x-forwarded-host" in connection_named:
            has_host = False
    proto = None if has_proto else scheme
    if not (prior_xff or prior_fwd):  # a client that is not behind a trusted proxy
        return b"".join(out), _direct_hop_block(peer, host, scheme, proto, not has_host)
    this_hop = _forwarded_element(peer, host, scheme)
    xff = ", ".join([*prior_xff, peer]) if prior_xff else peer
    fwd = ", ".join([*prior_fwd, this_hop]) if prior_fwd else this_hop
    hop = _hop_block(xff, proto, None if has_host else host, fwd)
    return b"".join(out), hop


@functools.lru_cache(maxsize=1024)
def _direct_hop_block(
    peer: str, host: str, scheme: str, proto: str | None, with_host: bool
) -> bytes:
    """`_hop_block` for a peer with no forwarding fields before it: one cache lookup per
    request instead of two (~1.3k instructions each)."""
    return _hop_block(
        peer, proto, host if with_host else None, _forwarded_element(peer, host, scheme)
    )


@functools.lru_cache(maxsize=1024)
def _hop_block(xff: str, proto: str | None, host: str | None, fwd: str) -> bytes:
    """This hop's forwarding fields as wire lines: the same for every request of a client
    that is not behind a trusted proxy. The values come from bytes llhttp accepted (decoded
    latin-1) and the peer's address, so they hold no CR, LF or NUL; checked all the same,
    once per distinct block (the cache), since the upstream head does not check it again."""
    lines = [f"X-Forwarded-For: {xff}\r\n"]
    if proto is not None:
        lines.append(f"X-Forwarded-Proto: {proto}\r\n")
    if host is not None:
        lines.append(f"X-Forwarded-Host: {host}\r\n")
    lines.append(f"Forwarded: {fwd}\r\n")
    if any(breaks_field(v) for v in (xff, proto or "", host or "", fwd)):
        raise ValueError(f"CR, LF or NUL in a forwarding field: {lines!r}")
    return "".join(lines).encode("latin-1")


def breaks_field(value: str) -> bool:
    """Whether a field value holds CR, LF or NUL, which could end its field early and start
    another field or request (RFC 9110 §5.5)."""
    return "\r" in value or "\n" in value or "\x00" in value


def upstream_headers(
    raw_headers: Sequence[tuple[bytes, bytes]],
    *,
    peer: str,
    peer_trusted: bool,
    scheme: str,
    host: str,
) -> list[tuple[str, str]]:
    """`forwarded_fields` as one list of text pairs (the client's first, then this hop's)."""
    block, hop = forwarded_fields(
        raw_headers, peer=peer, peer_trusted=peer_trusted, scheme=scheme, host=host
    )
    fields = []
    for line in (block + hop).decode("latin-1").split("\r\n")[:-1]:
        name, _, value = line.partition(": ")
        fields.append((name, value))
    return fields


# What a client's field name is to the proxy, by its raw bytes: (lower-case name, kind).
# Clients send the same few names over and over; a bounded cache makes the classification one
# dict probe per field instead of a decode, a lower() and up to four set lookups.
_FORWARD, _DROP, _HOP, _FORWARDING = 0, 1, 2, 3
_RAW_NAMES: dict[bytes, tuple[bytes, int]] = {}
_RAW_NAMES_MAX = 4096


def _classify(raw_name: bytes) -> tuple[bytes, int]:
    lname = raw_name.decode("latin-1").lower()
    if lname in HOP_BY_HOP:
        kind = _HOP
    elif lname in FORWARDING:
        kind = _FORWARDING
    elif lname.startswith(IDENTITY_PREFIX) or lname in GATEWAY_SET or _proxy_named(lname):
        kind = _DROP
    else:
        kind = _FORWARD
    known = (lname.encode("latin-1"), kind)
    if len(_RAW_NAMES) < _RAW_NAMES_MAX:
        _RAW_NAMES[raw_name] = known
    return known


# The names `_classify` knows by heart, as `_known_name` reads them: slots by length (the last
# one for longer names), each a tuple of (lower-case name, kind) entries.
_NAME_SLOTS = 64
_FORWARD_ENTRY = (b"", _FORWARD)  # the lower-case name is only read for hop and forwarding kinds
_DROP_ENTRY = (b"", _DROP)


def _name_table() -> tuple[tuple[tuple[bytes, int], ...], ...]:
    slots: list[list[tuple[bytes, int]]] = [[] for _ in range(_NAME_SLOTS)]
    for name in sorted(HOP_BY_HOP | FORWARDING | GATEWAY_SET | {"proxy"}):
        raw = name.encode("latin-1")
        slots[min(len(raw), _NAME_SLOTS - 1)].append(_classify(raw))
    return tuple(tuple(slot) for slot in slots)


# The C types of the compiled form (gateway/speedups.py declares them in the module's .pxd).
C_TYPES = {
    "_known_name": {
        "name": "bytes",
        "table": "tuple",
        "entries": "tuple",
        "entry": "tuple",
        "lname": "bytes",
        "size": "Py_ssize_t",
        "k": "Py_ssize_t",
    }
}


def _known_name(name: bytes, table: tuple[tuple[tuple[bytes, int], ...], ...]) -> tuple[bytes, int]:
    """`_classify` without a decode, a lower() or a cache: the name is compared, in any ASCII
    case, with the few known names of its length (``table``, `_name_table`), then with the
    prefixes of the names a client may not send. Compiled only (the sources use the cache)."""
    size = len(name)
    entries = table[size if size < 64 else 63]  # _NAME_SLOTS as a literal: a C comparison
    for k in range(len(entries)):
        entry = entries[k]
        lname = entry[0]
        if len(lname) == size and name_is(name, 0, lname):
            return entry
    if size >= 12 and name_is(name, 0, b"x-cityplane-"):  # IDENTITY_PREFIX
        return _DROP_ENTRY
    if size >= 6 and name_is(name, 0, b"proxy-"):
        return _DROP_ENTRY
    return _FORWARD_ENTRY


def _proxy_named(lname: str) -> bool:
    # "Proxy" (httpoxy: CGI turns it into HTTP_PROXY) and the Proxy-* family address this hop,
    # never the upstream; the upstream pool refuses to send them (gateway/upstream/client.py).
    return lname == "proxy" or lname.startswith("proxy-")


_NAME_TABLE = _name_table()


@functools.lru_cache(maxsize=1024)
def _forwarded_element(peer: str, host: str, scheme: str) -> str:
    """This hop's ``Forwarded`` element (RFC 7239 §4): the same for every request of a peer."""
    return f"for={_forwarded_node(peer)};host={_quote(host)};proto={scheme}"


@functools.lru_cache(maxsize=1024)
def _quote(value: str) -> str:
    # RFC 7239 §4: a host with ':' (a port or IPv6) must be a quoted-string.
    if all(c.isalnum() or c in "-._~" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
