"""OAuth clients: the admin API's `ClientSpec` and the object Authlib's grants ask questions of.

Contract: docs/identity-api.md. A client secret is 256 random bits shown once; the hub keeps
its SHA-256 digest (RFC 6749 §2.3.1 leaves the storage to the server; a slow hash buys nothing
against a 2^256 search and would cap client-credentials grants, see ADR 0007).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any, Literal

from authlib.oauth2.rfc6749 import ClientMixin
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CLIENT_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{1,62}$"
GrantType = Literal["authorization_code", "refresh_token", "client_credentials"]


class ClientSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    redirect_uris: list[str] = []
    scopes: list[str] = ["openid"]
    grant_types: list[GrantType] = ["authorization_code", "refresh_token"]
    public: bool = False
    min_trust_level: int = Field(default=1, ge=1, le=4)
    owner: str | None = None
    post_logout_redirect_uris: list[str] = []
    backchannel_logout_uri: str | None = None
    # OIDC Dynamic Client Registration §2 metadata: the alg of this client's ID tokens.
    id_token_signed_response_alg: Literal["ES256", "RS256"] | None = None

    @field_validator("redirect_uris", "post_logout_redirect_uris")
    @classmethod
    def _absolute(cls, uris: list[str]) -> list[str]:
        for uri in uris:
            # RFC 9700 §4.1.3 / §2.1: exact matching, no fragments, no wildcards.
            if not uri.startswith(("https://", "http://")) or "#" in uri or "*" in uri:
                raise ValueError(f"{uri!r} must be an absolute http(s) URI without fragment")
        return uris

    @model_validator(mode="after")
    def _consistent(self) -> ClientSpec:
        if self.public and "client_credentials" in self.grant_types:
            raise ValueError("a public client cannot use client_credentials")
        if "authorization_code" in self.grant_types and not self.redirect_uris:
            raise ValueError("authorization_code needs at least one redirect URI")
        return self


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class HubClient(ClientMixin):
    """A registered client as Authlib's grants see it (immutable snapshot of one row)."""

    __slots__ = ("client_id", "created_at", "secret_digest", "spec")

    def __init__(
        self, client_id: str, spec: ClientSpec, secret_digest: str | None, created_at: float
    ) -> None:
        self.client_id = client_id
        self.spec = spec
        self.secret_digest = secret_digest
        self.created_at = created_at

    def as_json(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            **self.spec.model_dump(),
            "created_at": self.created_at,
        }

    # --- authlib ClientMixin
    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        # OIDC Core §3.1.2.1 makes redirect_uri REQUIRED; never default it.
        return None

    def get_allowed_scope(self, scope: str) -> str:
        if not scope:
            return ""
        allowed = set(self.spec.scopes)
        return " ".join(s for s in scope.split() if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.spec.redirect_uris  # exact string match (RFC 9700 §2.1)

    def check_client_secret(self, client_secret: str) -> bool:
        if self.secret_digest is None:
            return False
        return hmac.compare_digest(digest(client_secret), self.secret_digest)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        if self.spec.public:
            return method == "none"
        return method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code" and "authorization_code" in self.spec.grant_types

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.spec.grant_types
