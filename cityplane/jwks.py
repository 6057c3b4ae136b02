"""The identity hub's signing keys and JWT access tokens, checked locally (shared kernel).

Parts that accept the hub's access tokens (the gateway, the registry) never call the hub per
request. They hold its JWK Set (RFC 7517), found through OpenID Connect Discovery 1.0 unless a
JWKS URL is given, refresh it in the background and on an unknown ``kid`` (rate-limited), and
verify JWT access tokens in the RFC 9068 profile with PyJWT. What each part derives from the
claims (upstream headers, registry permissions) stays in that part. Why this shape: docs/adr/0006.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
from collections.abc import Callable, Collection
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
from jwt import PyJWK
from jwt.exceptions import (
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidSignatureError,
    MissingRequiredClaimError,
    PyJWTError,
)

__all__ = [
    "ACCEPTED_TYP",
    "ALLOWED_ALGORITHMS",
    "AccessTokenDecoder",
    "InvalidToken",
    "JwksCache",
    "KeysUnavailable",
    "check_url",
    "refresh_interval",
]

log = logging.getLogger("cityplane.jwks")

# RFC 8725 §3.1: an explicit allowlist, never the token's own say. Asymmetric only: "none" and
# HS* (including HS256 "signed" with the public key as the secret) never reach a key.
ALLOWED_ALGORITHMS = frozenset({"ES256", "RS256", "PS256", "EdDSA"})
# RFC 9068 §2.1/§4: typ is "at+jwt" (media type names are case-insensitive, RFC 7515 §4.1.9).
# Plain "JWT" is accepted too, for issuers that do not set the profile's typ yet.
ACCEPTED_TYP = frozenset({"at+jwt", "application/at+jwt", "jwt"})
LEEWAY = 30.0  # seconds of clock skew allowed on exp, nbf and iat
REFETCH_INTERVAL = 10.0  # at most one unknown-kid refetch per this many seconds
MIN_REFRESH, DEFAULT_REFRESH, MAX_REFRESH = 300.0, 3600.0, 86400.0
FETCH_TIMEOUT = 5.0
MAX_DOCUMENT = 1024 * 1024  # a JWKS or discovery document larger than this is refused

_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)

# Key types and the allowed algorithms each can verify (RFC 7518 §3.1, RFC 8037 §3.1).
_ALGORITHMS_OF_KEY: dict[tuple[Any, Any], tuple[str, ...]] = {
    ("RSA", None): ("RS256", "PS256"),
    ("EC", "P-256"): ("ES256",),
    ("OKP", "Ed25519"): ("EdDSA",),
}
_MIN_RSA_BITS = 2048


class InvalidToken(Exception):
    """The token cannot be trusted; ``description`` is safe to quote in WWW-Authenticate."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


class KeysUnavailable(Exception):
    """The issuer's keys have never been fetched: no token can be checked yet."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"signing keys unavailable, retry after {retry_after}s")
        self.retry_after = retry_after


def refresh_interval(cache_control: str | None) -> float:
    """Seconds until the next JWKS refresh: Cache-Control max-age, bounded to 5 min-24 h."""
    if cache_control:
        match = _MAX_AGE.search(cache_control)
        if match:
            return min(MAX_REFRESH, max(MIN_REFRESH, float(match.group(1))))
    return DEFAULT_REFRESH


def check_url(url: str, what: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} {url!r} is not an http(s) URL with a host")
    return url


def _keys_from_set(document: Any) -> dict[str, dict[str, PyJWK]]:
    """kid -> {algorithm -> key} for every usable signing key of a JWK Set."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWK Set (no 'keys' list)")
    keys: dict[str, dict[str, PyJWK]] = {}
    for jwk in document["keys"]:
        if not isinstance(jwk, dict):
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid:
            log.warning("JWKS: a key without 'kid' is ignored (tokens must name their key)")
            continue
        if jwk.get("use", "sig") != "sig":  # RFC 7517 §4.2: only signature keys
            continue
        kty = jwk.get("kty")
        algorithms = _ALGORITHMS_OF_KEY.get((kty, None if kty == "RSA" else jwk.get("crv")), ())
        if "alg" in jwk:  # RFC 7517 §4.4: a key that names its algorithm is used only with it
            algorithms = tuple(a for a in algorithms if a == jwk["alg"])
        for alg in algorithms:
            try:
                key = PyJWK(jwk, algorithm=alg)
            except PyJWTError as exc:
                log.warning("JWKS: key %r ignored: %s", kid, exc)
                break
            if kty == "RSA" and getattr(key.key, "key_size", 0) < _MIN_RSA_BITS:
                log.warning("JWKS: RSA key %r ignored: shorter than %d bits", kid, _MIN_RSA_BITS)
                break
            keys.setdefault(kid, {}).setdefault(alg, key)
    if not keys:
        raise ValueError("the JWK Set has no usable signing key (ES256, RS256, PS256, EdDSA)")
    return keys


class JwksCache:
    """The issuer's signing keys, fetched off the request path.

    Fetched once at start, then again after the Cache-Control max-age of the last answer
    (bounded), after a failure with exponential backoff, and on demand for an unknown ``kid``
    at most once per ``refetch_interval``. A failed refresh keeps the keys already held.
    """

    def __init__(
        self,
        issuer: str,
        *,
        jwks_url: str | None = None,
        retry_min: float = 0.25,
        retry_max: float = 30.0,
        refetch_interval: float = REFETCH_INTERVAL,
        on_withdrawn: Callable[[Collection[str]], None] | None = None,
    ) -> None:
        self.issuer = issuer
        self._configured_jwks_url = check_url(jwks_url, "JWKS URL") if jwks_url else None
        self._jwks_url = self._configured_jwks_url
        self._retry_min = retry_min
        self._retry_max = retry_max
        self._refetch_interval = refetch_interval
        self._on_withdrawn = on_withdrawn
        self._keys: dict[str, dict[str, PyJWK]] = {}
        self.loaded = False
        self._failures = 0
        self._next_attempt = 0.0  # loop time of the next background attempt
        self._last_refetch = -math.inf
        self._inflight: asyncio.Future[bool] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def discovery_url(self) -> str:
        # OpenID Connect Discovery 1.0 §4: the issuer with "/.well-known/openid-configuration"
        # appended (after removing a trailing "/").
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"

    # -- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """One fetch attempt now (the gateway starts either way), then refresh in background."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT),
            headers={"Accept": "application/json"},
        )
        await self._fetch()
        self._task = asyncio.create_task(self._refresh_forever(), name="jwks-refresh")

    async def close(self) -> None:
        for task in (self._task, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- lookups (request path) ----------------------------------------------------------------

    def key(self, kid: str, alg: str) -> PyJWK | None:
        by_alg = self._keys.get(kid)
        return by_alg.get(alg) if by_alg is not None else None

    def knows(self, kid: str) -> bool:
        return kid in self._keys

    def retry_after(self) -> int:
        """Whole seconds until the next background attempt, at least 1 (for Retry-After)."""
        wait = self._next_attempt - asyncio.get_running_loop().time()
        return max(1, math.ceil(wait))

    async def refetch_for_unknown_kid(self) -> bool:
        """Fetch again for a ``kid`` we do not hold; False when the rate limit says not now.

        Forged tokens can name any kid, so this is what keeps them from driving requests at
        the hub: one refetch per ``refetch_interval`` whatever the number of unknown kids.
        """
        if self._inflight is not None and not self._inflight.done():
            return await asyncio.shield(self._inflight)
        now = asyncio.get_running_loop().time()
        if now - self._last_refetch < self._refetch_interval:
            return False
        self._last_refetch = now
        return await asyncio.shield(self._fetch_shared())

    # -- fetching ------------------------------------------------------------------------------

    def _fetch_shared(self) -> asyncio.Future[bool]:
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._fetch())
        return self._inflight

    async def _refresh_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Re-read after each sleep: an unknown-kid refetch may have moved the schedule.
            delay = self._next_attempt - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            try:
                await asyncio.shield(self._fetch_shared())
            except Exception:
                # A bug in one attempt must not end the refreshing for the process's life.
                log.exception("JWKS refresh of %s failed", self.issuer)
                self._next_attempt = loop.time() + self._retry_max

    async def _fetch(self) -> bool:
        """One attempt; schedules the next background one. True when keys were loaded."""
        loop = asyncio.get_running_loop()
        try:
            keys, interval = await self._load()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._failures += 1
            delay = min(self._retry_max, self._retry_min * 2 ** (self._failures - 1))
            self._next_attempt = loop.time() + delay
            if self._configured_jwks_url is None:
                self._jwks_url = None  # discover again: the hub may have moved its JWKS
            log.warning(
                "JWKS of %s unavailable (%s: %s); %s; retrying in %.2gs",
                self.issuer,
                type(exc).__name__,
                exc,
                "keeping the keys already held" if self.loaded else "no token can be checked",
                delay,
            )
            return False
        withdrawn = self._keys.keys() - keys.keys()
        self._keys = keys
        self.loaded = True
        self._failures = 0
        self._next_attempt = loop.time() + interval
        if withdrawn and self._on_withdrawn is not None:
            self._on_withdrawn(withdrawn)
        log.info("JWKS of %s: %d keys, next refresh in %gs", self.issuer, len(keys), interval)
        return True

    async def _load(self) -> tuple[dict[str, dict[str, PyJWK]], float]:
        if self._jwks_url is None:
            discovery, _ = await self._get_json(self.discovery_url)
            if not isinstance(discovery, dict):
                raise ValueError("the discovery document is not a JSON object")
            # OpenID Connect Discovery 1.0 §4.3: the issuer in the document MUST be identical.
            if discovery.get("issuer") != self.issuer:
                raise ValueError(
                    f"discovery names issuer {discovery.get('issuer')!r}, not {self.issuer!r}"
                )
            jwks_uri = discovery.get("jwks_uri")
            if not isinstance(jwks_uri, str):
                raise ValueError("the discovery document has no jwks_uri")
            self._jwks_url = check_url(jwks_uri, "jwks_uri")
        document, cache_control = await self._get_json(self._jwks_url)
        return _keys_from_set(document), refresh_interval(cache_control)

    async def _get_json(self, url: str) -> tuple[Any, str | None]:
        assert self._session is not None, "JwksCache.start() was not called"
        async with self._session.get(url) as resp:
            if resp.status != 200:
                raise ValueError(f"GET {url} answered {resp.status}")
            if (resp.content_length or 0) > MAX_DOCUMENT:
                raise ValueError(f"GET {url}: document larger than {MAX_DOCUMENT} bytes")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(65536):
                body += chunk
                if len(body) > MAX_DOCUMENT:
                    raise ValueError(f"GET {url}: document larger than {MAX_DOCUMENT} bytes")
            try:
                return json.loads(body), resp.headers.get("Cache-Control")
            except (UnicodeDecodeError, ValueError) as exc:
                raise ValueError(f"GET {url}: not JSON ({exc})") from None


class AccessTokenDecoder:
    """Token string -> verified claims, or :class:`InvalidToken` saying why not.

    Checks (RFC 9068 §4): an allowed asymmetric algorithm, typ, a known kid, the signature,
    iss (exact), aud (when an audience is configured), exp/nbf/iat with ``LEEWAY``; ``exp``,
    ``iss`` and ``sub`` are required. Signature checks run on the event loop: ~50-100 µs
    (measured in docs/adr/0006), less than a hop to a thread pool would cost.
    """

    def __init__(
        self,
        issuer: str,
        *,
        jwks_url: str | None = None,
        audience: str | None = None,
        algorithms: Collection[str] = ALLOWED_ALGORITHMS,
        accepted_typ: Collection[str] = ACCEPTED_TYP,
        on_withdrawn: Callable[[Collection[str]], None] | None = None,
    ) -> None:
        self.issuer = check_url(issuer, "issuer")
        self.audience = audience
        unknown = set(algorithms) - ALLOWED_ALGORITHMS
        if unknown:  # RFC 8725 §3.1: never widen the asymmetric allowlist (no none, no HS*)
            raise ValueError(f"algorithms {sorted(unknown)} are not accepted")
        self.algorithms = frozenset(algorithms)
        self.accepted_typ = frozenset(t.lower() for t in accepted_typ)
        self.keys = JwksCache(issuer, jwks_url=jwks_url, on_withdrawn=on_withdrawn)
        self._options: jwt.types.Options = {
            "require": ["exp", "iss", "sub"],
            "verify_aud": audience is not None,
            "enforce_minimum_key_length": True,
        }

    async def start(self) -> None:
        await self.keys.start()

    async def close(self) -> None:
        await self.keys.close()

    async def decode(self, token: str) -> dict[str, Any]:
        """The token's claims once every check passed; raises InvalidToken or
        KeysUnavailable (no key set was ever fetched)."""
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError:
            raise InvalidToken("The access token is not a well-formed JWT") from None
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise InvalidToken("The token's signing algorithm is not accepted")
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in self.accepted_typ:
            raise InvalidToken("The token is not a JWT access token (typ)")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise InvalidToken("The token does not name its signing key (kid)")
        if not self.keys.loaded:
            raise KeysUnavailable(self.keys.retry_after())
        key = self.keys.key(kid, alg)
        if key is None and not self.keys.knows(kid) and await self.keys.refetch_for_unknown_kid():
            key = self.keys.key(kid, alg)
        if key is None:
            if self.keys.knows(kid):
                raise InvalidToken("The token's algorithm does not match its signing key")
            raise InvalidToken("The token's signing key is unknown")
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[alg],
                issuer=self.issuer,
                audience=self.audience,
                leeway=LEEWAY,
                options=self._options,
            )
        except InvalidSignatureError:
            raise InvalidToken("The token signature is invalid") from None
        except ExpiredSignatureError:
            raise InvalidToken("The access token expired") from None
        except ImmatureSignatureError:
            raise InvalidToken("The access token is not valid yet") from None
        except InvalidIssuerError:
            raise InvalidToken("The access token is from another issuer") from None
        except InvalidAudienceError:
            raise InvalidToken("The access token is for another audience") from None
        except MissingRequiredClaimError as exc:
            raise InvalidToken(f"The access token has no {exc.claim} claim") from None
        except PyJWTError:
            raise InvalidToken("The access token is invalid") from None
