"""The identity hub's access tokens (docs/identity-api.md) as registry callers.

The registry dogfoods the hub like the gateway does: JWTs in the RFC 9068 profile, checked
locally against the hub's JWKS (`cityplane.jwks`: fetched off the request path, refetched on an
unknown `kid` at most once per 10 s). Stricter than the gateway on two points, because a
registry token changes what the whole city routes: only ES256 and RS256 (what the hub signs
with), and `typ` must be the profile's `at+jwt` (RFC 9068 §4: resource servers MUST check it).
"""

from __future__ import annotations

import logging

from cityplane.jwks import AccessTokenDecoder, InvalidToken, KeysUnavailable
from cityplane.problem import Problem
from registry.auth import Principal, unauthorized
from registry.models import OWNER_MAX

log = logging.getLogger(__name__)

ALGORITHMS = frozenset({"ES256", "RS256"})
TYP = frozenset({"at+jwt", "application/at+jwt"})


def looks_like_a_jwt(token: str) -> bool:
    """Three base64url parts (RFC 7519 §3): anything else is left to the other verifiers."""
    return token.count(".") == 2


class HubTokenVerifier:
    """A `registry.auth.TokenVerifier` for the hub's access tokens."""

    def __init__(
        self, issuer: str, *, jwks_url: str | None = None, audience: str | None = None
    ) -> None:
        self._decoder = AccessTokenDecoder(
            issuer, jwks_url=jwks_url, audience=audience, algorithms=ALGORITHMS, accepted_typ=TYP
        )
        self.issuer = self._decoder.issuer
        self.audience = audience

    async def start(self) -> None:
        """One JWKS fetch attempt now (the registry starts either way), then in background."""
        if self.audience is None:
            log.warning(
                "no --audience: hub tokens are accepted whatever their 'aud' "
                "(RFC 9068 §4 asks resource servers to check it)"
            )
        await self._decoder.start()

    async def close(self) -> None:
        await self._decoder.close()

    async def verify(self, token: str) -> Principal | None:
        if not looks_like_a_jwt(token):
            return None
        try:
            claims = await self._decoder.decode(token)
        except InvalidToken as exc:
            raise unauthorized(exc.description, "invalid_token", exc.description) from None
        except KeysUnavailable as exc:
            # Not the caller's fault: the hub's keys were never fetched (it is down).
            raise Problem(
                503,
                "keys-unavailable",
                "the identity hub's signing keys are not available yet; retry later",
                headers={"Retry-After": str(exc.retry_after)},
            ) from None
        return principal_of(claims)


def principal_of(claims: dict[str, object]) -> Principal:
    """docs/identity-api.md: `sub` (a person, or the client for client credentials),
    `client_id`, `org` (the organization the token acts for), `scope` (space-separated)."""
    scope = claims.get("scope", "")
    if not isinstance(scope, str):  # RFC 9068 §2.2.3
        raise unauthorized("the token's scope is not a string", "invalid_token")
    org = claims.get("org")
    if isinstance(org, str) and len(org) > OWNER_MAX:  # could never be a stored spec.owner
        raise unauthorized(f"the token's org is over {OWNER_MAX} characters", "invalid_token")
    client_id = claims.get("client_id")
    return Principal.from_scopes(
        str(claims["sub"]),
        frozenset(scope.split()),
        organization=org if isinstance(org, str) and org else None,
        client_id=client_id if isinstance(client_id, str) and client_id else None,
    )
