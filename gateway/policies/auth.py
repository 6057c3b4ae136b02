"""The ``auth`` block of a route: bearer token, scopes, trust level and authentication age.

Token checks live in :mod:`gateway.jwks`; this module decides what the client is told
(RFC 6750 §3, RFC 9470 §3) and what the upstream learns (X-CityPlane-* identity headers, which
:mod:`gateway.forwarding` strips from every client request first).
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

from cityplane.problem import Problem
from gateway.jwks import InvalidToken, KeysUnavailable, VerifiedToken

if TYPE_CHECKING:
    from collections.abc import Callable

    from cityplane.schema import Auth
    from gateway.exchange import Exchange
    from gateway.jwks import TokenVerifier

__all__ = ["REALM", "AuthPolicy", "acr_of_level"]

REALM = "cityplane"
_CHALLENGE = f'Bearer realm="{REALM}"'
# RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ), safe inside a quoted-string.
_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")
# RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")


def acr_of_level(level: int) -> str:
    return f"urn:cityplane:loa:{level}"


def _quoted(description: str) -> str:
    # RFC 6750 §3: error_description is limited to %x20-21 / %x23-5B / %x5D-7E.
    return "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in description)


def _bearer(value: str) -> str | None:
    """The token of an Authorization field's value, or ``None`` for another scheme."""
    # The scheme is what precedes the first space. RFC 9110 §11.1: it is case-insensitive.
    # Another scheme (Basic, …) is not a bearer token: the request has none, and the header
    # goes upstream untouched. Slices and compares, no method calls: "Bearer" as written by
    # nearly every client is one compare.
    scheme = value[:6]
    if (scheme != "Bearer" and scheme.lower() != "bearer") or value[6:7] not in ("", " "):
        return None
    # RFC 7235 allows more than one space after the scheme.
    token = value[7:]
    return token.lstrip(" ") if token[:1] == " " else token


class AuthPolicy:
    """The ``auth`` block of one route, compiled once: every challenge header is built here."""

    name: ClassVar[str] = "auth"

    __slots__ = (
        "_acr",
        "_max_age",
        "_max_age_param",
        "_min_level",
        "_required",
        "_route_id",
        "_scope_challenge",
        "_scope_param",
        "_scopes",
        "_step_up",
        "_verifier",
    )

    def __init__(self, route_id: str, spec: Auth, verifier: TokenVerifier) -> None:
        for scope in spec.scopes:
            if not _SCOPE_TOKEN.match(scope):
                raise ValueError(f"auth.scopes: {scope!r} is not an OAuth scope token")
        self._route_id = route_id
        self._verifier = verifier
        self._required = spec.required
        self._scopes = frozenset(spec.scopes)
        self._scope_param = " ".join(spec.scopes)
        # RFC 6750 §3.1: insufficient_scope, with the scope the request needs.
        self._scope_challenge = (
            f'{_CHALLENGE}, error="insufficient_scope", scope="{self._scope_param}"'
        )
        self._min_level = spec.minTrustLevel
        self._acr = acr_of_level(spec.minTrustLevel)
        self._max_age = spec.maxAge
        # RFC 9470 §3: max_age is in whole seconds; rounding down is the stricter reading.
        self._max_age_param = int(spec.maxAge) if spec.maxAge is not None else None
        # RFC 9470 §3: insufficient_user_authentication with acr_values and/or max_age, as
        # (WWW-Authenticate, detail), keyed by (level too low, authentication too old).
        prefix = f'{_CHALLENGE}, error="insufficient_user_authentication", error_description='
        acr_values = f'acr_values="{self._acr}"'
        level = f"trust level {self._min_level} ({self._acr})"
        self._step_up: dict[tuple[bool, bool], tuple[str, str]] = {
            (True, False): (
                f'{prefix}"A higher trust level is required", {acr_values}',
                f"This route requires {level}.",
            )
        }
        if self._max_age_param is not None:
            max_age = f'max_age="{self._max_age_param}"'
            age = f"an authentication at most {self._max_age_param}s old"
            self._step_up[False, True] = (
                f'{prefix}"A more recent authentication is required", {max_age}',
                f"This route requires {age}.",
            )
            self._step_up[True, True] = (
                f'{prefix}"A higher trust level and a more recent authentication are '
                f'required", {acr_values}, {max_age}',
                f"This route requires {level} and {age}.",
            )

    def check_now(self, exchange: Exchange) -> bool:
        """Decide without waiting if the token is absent, not a bearer token, or verified
        before (the cache); ``False`` when it has to be verified (``check``)."""
        # RFC 6750 §2.1: the Authorization header only; tokens in the query are not looked at.
        request = exchange.request
        value = request.authorization
        if value is None:
            self._no_token()
            return True
        if request.authorizations != 1:
            self._invalid("More than one Authorization header")
        # The cache is keyed by the field's text: a connection's requests share one str whose
        # hash is kept (gateway/h1server.py), and the token needs no slicing out first.
        verified = self._verifier.cached(value)
        if verified is None:
            token = _bearer(value)
            if token is None:
                self._no_token()
                return True
            # Verified before under the token itself (`TokenVerifier.verify` without a key).
            # A spelling not seen yet ("Bearer  t", "bearer t") is verified by `check` and
            # remembered under its own text.
            verified = self._verifier.cached(token)
            if verified is None:
                return False
        self._admit(exchange, verified)
        return True

    def check_soon(self, exchange: Exchange, then: Callable[[Problem | None], None]) -> bool:
        return False  # verifying a new token may fetch the hub's keys: the task awaits it

    async def check(self, exchange: Exchange) -> None:
        if self.check_now(exchange):
            return
        value = exchange.request.authorization
        assert value is not None  # check_now decided every request without one
        token = _bearer(value)
        assert token is not None
        self._admit(exchange, await self._verify(token, value))

    def _admit(self, exchange: Exchange, verified: VerifiedToken) -> None:
        if not self._scopes <= verified.scopes:
            raise Problem(
                403,
                "insufficient-scope",
                f"This route requires the scopes: {self._scope_param}",
                headers={"WWW-Authenticate": self._scope_challenge},
                scope=self._scope_param,
            )
        low = verified.level < self._min_level
        old = self._max_age is not None and (
            verified.auth_time is None or time.time() - verified.auth_time > self._max_age
        )
        if low or old:
            self._step_up_needed(low, old)
        exchange.consumer = verified.consumer
        exchange.identity = verified.claims
        exchange.upstream_block += verified.header_block

    async def _verify(self, token: str, field: str) -> VerifiedToken:
        if not _B64TOKEN.match(token):
            self._invalid("The Authorization header does not carry a bearer token")
        try:
            return await self._verifier.verify(token, key=field)
        except InvalidToken as exc:
            self._invalid(exc.description)
        except KeysUnavailable as exc:
            raise Problem(
                503,
                "token-keys-unavailable",
                "The identity hub's signing keys could not be fetched yet, so no access token "
                "can be checked; retry later.",
                headers={"Retry-After": str(exc.retry_after)},
            ) from None

    def _no_token(self) -> None:
        if self._required:
            # RFC 6750 §3.1: no error code when the request carried no authentication at all.
            raise Problem(
                401,
                "token-required",
                "This route requires a bearer access token.",
                headers={"WWW-Authenticate": _CHALLENGE},
            )

    def _invalid(self, description: str) -> NoReturn:
        # RFC 6750 §3.1: invalid_token, whether or not the route requires a token.
        raise Problem(
            401,
            "invalid-token",
            description,
            headers={
                "WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token", '
                f'error_description="{_quoted(description)}"'
            },
        )

    def _step_up_needed(self, low: bool, old: bool) -> NoReturn:
        header, detail = self._step_up[low, old]
        extensions: dict[str, Any] = {}
        if low:
            extensions["acr_values"] = self._acr
        if old:
            extensions["max_age"] = self._max_age_param
        raise Problem(
            401,
            "insufficient-user-authentication",
            detail,
            headers={"WWW-Authenticate": header},
            **extensions,
        )
