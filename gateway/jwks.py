"""Access tokens checked locally: the verified-token cache and what the gateway derives.

The JWKS fetching and the RFC 9068 checks are the shared kernel's (:mod:`cityplane.jwks`);
this module adds what only the gateway needs: a verified token is cached until it expires, so
a client that keeps its token pays for the signature once, and its claims become the identity
headers for upstreams. Why this shape: docs/adr/0006.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from typing import Any
from urllib.parse import quote

from cityplane.jwks import (
    ALLOWED_ALGORITHMS,
    LEEWAY,
    AccessTokenDecoder,
    InvalidToken,
    JwksCache,
    KeysUnavailable,
    refresh_interval,
)
from gateway.forwarding import breaks_field

__all__ = [
    "ALLOWED_ALGORITHMS",
    "LEEWAY",
    "InvalidToken",
    "JwksCache",
    "KeysUnavailable",
    "TokenVerifier",
    "VerifiedToken",
    "refresh_interval",
]

log = logging.getLogger("cityplane.gateway.jwks")

CACHE_SIZE = 10_000

# ARCHITECTURE.md, "Trust levels": acr values of levels 1-4; anything else is level 0.
TRUST_LEVELS = {f"urn:cityplane:loa:{n}": n for n in range(1, 5)}

# Header values for upstreams: visible ASCII and space pass as they are; anything else
# (and "%" itself, so decoding is unambiguous) is percent-encoded as UTF-8.
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def _header_value(value: str) -> str:
    return quote(value, safe=_HEADER_SAFE)


class VerifiedToken:
    """A verified access token and what the gateway derives from it, computed once."""

    __slots__ = (
        "auth_time",
        "claims",
        "consumer",
        "expires_at",
        "header_block",
        "headers",
        "level",
        "scopes",
    )

    def __init__(self, claims: dict[str, Any], expires_at: float) -> None:
        self.claims = claims
        self.expires_at = expires_at
        subject: str = claims["sub"]
        client_id = claims.get("client_id")
        if client_id is not None and not isinstance(client_id, str):
            raise InvalidToken("The client_id claim is not a string")
        # Rate-limit key "consumer": the client (application), or else the subject.
        self.consumer: str = client_id or subject
        scope = claims.get("scope", "")
        if not isinstance(scope, str):  # RFC 9068 §2.2.3: a space-separated string
            raise InvalidToken("The scope claim is not a string")
        self.scopes = frozenset(scope.split())
        acr = claims.get("acr")
        self.level: int = TRUST_LEVELS.get(acr, 0) if isinstance(acr, str) else 0
        auth_time = claims.get("auth_time")
        if auth_time is not None and (
            isinstance(auth_time, bool) or not isinstance(auth_time, int | float)
        ):
            raise InvalidToken("The auth_time claim is not a number")
        self.auth_time: float | None = auth_time
        org = claims.get("org")
        headers = [
            ("X-CityPlane-Subject", _header_value(subject)),
            ("X-CityPlane-Level", str(self.level)),
        ]
        if client_id:
            headers.append(("X-CityPlane-Client", _header_value(client_id)))
        if auth_time is not None:
            headers.append(("X-CityPlane-Auth-Time", str(int(auth_time))))
        if isinstance(org, str) and org:
            headers.append(("X-CityPlane-Organization", _header_value(org)))
        if self.scopes:
            headers.append(("X-CityPlane-Scopes", _header_value(" ".join(scope.split()))))
        self.headers: tuple[tuple[str, str], ...] = tuple(headers)
        # The same as wire lines, for the upstream head, which does not check them again (the
        # values are percent-encoded ASCII: no CR, LF or NUL can be in them; checked once here).
        if any(breaks_field(v) for _, v in headers):
            raise InvalidToken("A claim cannot be passed on as a header field")
        self.header_block = "".join(f"{n}: {v}\r\n" for n, v in headers).encode("ascii")


class TokenVerifier:
    """Token string -> :class:`VerifiedToken`, or :class:`InvalidToken` saying why not.

    The checks are :class:`cityplane.jwks.AccessTokenDecoder`'s; verified tokens are cached.
    """

    __slots__ = (
        "_cache_size",
        "_clock",
        "_decoder",
        "_verified",
        "audience",
        "issuer",
        "keys",
    )

    def __init__(
        self,
        issuer: str,
        *,
        jwks_url: str | None = None,
        audience: str | None = None,
        cache_size: int = CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._decoder = AccessTokenDecoder(
            issuer, jwks_url=jwks_url, audience=audience, on_withdrawn=self._forget_withdrawn
        )
        self.issuer = self._decoder.issuer
        self.audience = audience
        self.keys = self._decoder.keys
        self._clock = clock
        self._cache_size = cache_size
        # Insertion-ordered: the first entry is the oldest, evicted first.
        self._verified: dict[str, VerifiedToken] = {}

    async def start(self) -> None:
        if self.audience is None:
            log.warning(
                "no --audience: access tokens are accepted whatever their 'aud' "
                "(RFC 9068 §4 asks resource servers to check it)"
            )
        await self._decoder.start()

    async def close(self) -> None:
        await self._decoder.close()

    def cached(self, token: str) -> VerifiedToken | None:
        """The hot path: a token verified before and not expired since."""
        verified = self._verified
        if token not in verified:  # `in` and [] are C calls compiled; .get() a call by name
            return None
        entry: VerifiedToken = verified[token]
        if entry.expires_at <= self._clock():
            self._verified.pop(token, None)
            return None
        return entry

    async def verify(self, token: str, *, key: str | None = None) -> VerifiedToken:
        """Verify ``token``, or take it from the cache under ``key`` (the token itself by
        default; the gateway's auth policy uses the whole Authorization field, which it has
        as one str per connection and need not slice)."""
        key = token if key is None else key
        entry = self.cached(key)
        if entry is not None:
            return entry
        claims = await self._decoder.decode(token)
        entry = VerifiedToken(claims, float(claims["exp"]) + LEEWAY)
        self._remember(key, entry)
        return entry

    def _remember(self, token: str, entry: VerifiedToken) -> None:
        cache = self._verified
        now = self._clock()
        # Evict the oldest entries: expired ones first (cheap to check at the front), then
        # whatever is oldest when the cache is full.
        while cache:
            oldest = next(iter(cache))
            if cache[oldest].expires_at > now and len(cache) < self._cache_size:
                break
            del cache[oldest]
        cache[token] = entry

    def _forget_withdrawn(self, kids: Collection[str]) -> None:
        # A key the issuer no longer publishes must stop vouching for cached tokens at once.
        log.info("JWKS: keys %s withdrawn; verified-token cache cleared", sorted(kids))
        self._verified.clear()
