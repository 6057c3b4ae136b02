"""Real-person verification: a live face matched against the resident ID's record, signed.

The match itself happens at a provider (in China typically the public security bureau's
portrait comparison service, reached through a licensed provider whose SDK or H5 page also
runs the liveness check on the person's device). Its answer often travels back through the
browser, so the hub trusts only a *signed* result, bound to the session by a nonce:

1. the hub makes a fresh ``nonce`` for this attempt and remembers it in the session;
2. a :class:`FaceMatcher` (or the provider's page) produces a compact JWS, the *face result*;
3. :func:`verify_face_result` checks the signature against the provider's keys, the algorithm
   against an allow-list (never ``none``, never an HMAC: RFC 8725 §3.1-3.2), the explicit
   type (RFC 8725 §3.11), the subject, the nonce and the age; the hub then forgets the nonce,
   so a result is used once.

Face result profile (JWS, RFC 7515)::

    header  {"alg": "ES256", "kid": "...", "typ": "face-result+jwt"}
    claims  {"iss": provider, "sub": hub subject, "rid": resident-ID fingerprint,
             "nonce": ..., "iat": seconds, "matched": bool, "score": 0..1}

A real provider plugs in by implementing ``FaceMatcher.match`` (calling its API with the
image and returning a token in this profile — from the provider, or from a signing service in
the provider's trust domain) and by configuring its public keys (JWKS) for verification.
:class:`DevFaceMatcher` is the reference adapter for development: it signs ES256 with a local
key and "matches" any JPEG or PNG image of at least 1 KiB.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

FACE_RESULT_TYP = "face-result+jwt"
DEFAULT_ALGORITHMS = ("ES256", "ES384", "RS256", "PS256", "EdDSA")
_FORBIDDEN_ALGORITHMS = {"none", "HS256", "HS384", "HS512"}
CLOCK_SKEW = 30.0

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
FaceKeys = PublicKey | Mapping[str, Any]  # a public key, a JWK, or a JWKS {"keys": [...]}

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIN_IMAGE_BYTES = 1024


class FaceResultInvalid(Exception):
    """The face result cannot be trusted: signature, algorithm, type, subject, nonce or age."""


@dataclass(frozen=True)
class FaceResult:
    matched: bool
    score: float
    issued_at: float


class FaceMatcher(Protocol):
    async def match(
        self, *, subject: str, resident_id_fingerprint: str, image: bytes, nonce: str
    ) -> str:
        """Compare ``image`` with the portrait on record; a signed face result (compact JWS)."""
        ...


def _looks_like_a_photo(image: bytes) -> bool:
    return len(image) >= MIN_IMAGE_BYTES and image.startswith((_JPEG_MAGIC, _PNG_MAGIC))


class DevFaceMatcher:
    """Signs ES256 face results locally; ``accept`` decides what matches (default: a photo)."""

    def __init__(
        self,
        private_key: ec.EllipticCurvePrivateKey,
        accept: Callable[[bytes], bool] | None = None,
        *,
        issuer: str = "cityplane-dev-face",
        kid: str = "dev-face",
    ) -> None:
        self._key = private_key
        self._accept = accept or _looks_like_a_photo
        self.issuer = issuer
        self.kid = kid

    def public_jwks(self) -> dict[str, Any]:
        """The JWKS that verifies this matcher's results."""
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        return {"keys": [{**jwk, "kid": self.kid, "alg": "ES256", "use": "sig"}]}

    async def match(
        self, *, subject: str, resident_id_fingerprint: str, image: bytes, nonce: str
    ) -> str:
        matched = self._accept(image)
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "rid": resident_id_fingerprint,
            "nonce": nonce,
            "iat": int(time.time()),
            "matched": matched,
            "score": 0.98 if matched else 0.02,
        }
        return jwt.encode(
            claims, self._key, algorithm="ES256", headers={"kid": self.kid, "typ": FACE_RESULT_TYP}
        )


def verify_face_result(
    token: str,
    *,
    keys: FaceKeys,
    subject: str,
    nonce: str,
    now: float,
    max_age: float = 300,
    issuer: str | None = None,
    resident_id_fingerprint: str | None = None,
    algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
    typ: str | None = FACE_RESULT_TYP,
) -> FaceResult:
    """The verified result, or :class:`FaceResultInvalid` saying what was wrong.

    A validly signed result that did not match is returned (``matched=False``), not raised:
    the caller records the failed attempt.
    """
    allowed = set(algorithms)
    if allowed & _FORBIDDEN_ALGORITHMS:
        raise ValueError(f"face results may not be accepted with {allowed & _FORBIDDEN_ALGORITHMS}")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise FaceResultInvalid(f"not a JWS: {exc}") from None
    alg = header.get("alg")
    if alg not in allowed:
        raise FaceResultInvalid(f"algorithm {alg!r} is not allowed")
    if typ is not None and header.get("typ") != typ:
        raise FaceResultInvalid(f"type {header.get('typ')!r} is not {typ!r}")
    key = _select_key(keys, header.get("kid"), alg)
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[alg],
            # Time is checked below against the caller's clock; "iat" must be there.
            options={
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
                "require": ["iat", "sub", "nonce"],
            },
        )
    except (jwt.PyJWTError, TypeError, ValueError) as exc:
        raise FaceResultInvalid(f"signature or claims rejected: {exc}") from None
    if claims["sub"] != subject:
        raise FaceResultInvalid("the result is for another subject")
    if claims["nonce"] != nonce:
        raise FaceResultInvalid("the nonce does not match this attempt (replayed result?)")
    if issuer is not None and claims.get("iss") != issuer:
        raise FaceResultInvalid(f"issuer {claims.get('iss')!r} is not {issuer!r}")
    if resident_id_fingerprint is not None and claims.get("rid") != resident_id_fingerprint:
        raise FaceResultInvalid("the result is for another resident ID")
    issued_at = claims["iat"]
    if not isinstance(issued_at, int | float) or isinstance(issued_at, bool):
        raise FaceResultInvalid("iat is not a number")
    if issued_at > now + CLOCK_SKEW:
        raise FaceResultInvalid("the result is issued in the future")
    if now - issued_at > max_age:
        raise FaceResultInvalid(f"the result is older than {max_age:.0f}s")
    matched, score = claims.get("matched"), claims.get("score", 0.0)
    if not isinstance(matched, bool) or not isinstance(score, int | float):
        raise FaceResultInvalid("matched must be a boolean and score a number")
    return FaceResult(matched=matched, score=float(score), issued_at=float(issued_at))


def _select_key(keys: FaceKeys, kid: Any, alg: str) -> Any:
    if not isinstance(keys, Mapping):
        return keys  # PyJWT refuses a key of the wrong type for ``alg``
    raw = list(keys["keys"]) if "keys" in keys else [dict(keys)]
    if kid is not None:
        raw = [k for k in raw if isinstance(k, Mapping) and k.get("kid") == kid]
    elif len(raw) > 1:
        raise FaceResultInvalid("the result names no key (kid) and there are several")
    if not raw:
        raise FaceResultInvalid(f"no verification key {kid!r}")
    declared = raw[0].get("alg")
    if declared is not None and declared != alg:
        raise FaceResultInvalid(f"key {kid!r} is for {declared}, not {alg}")
    try:
        # With the token's alg, so an RSA key serves RS256 or PS256 as the token says.
        return jwt.PyJWK(dict(raw[0]), algorithm=alg).key
    except (jwt.PyJWTError, TypeError, ValueError, KeyError) as exc:
        raise FaceResultInvalid(f"unusable verification key: {exc}") from None
