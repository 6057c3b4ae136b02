"""The running hub's shared state and its settings: one object the handlers reach through the
aiohttp app (`request.app[HUB]`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from sqlalchemy.ext.asyncio import AsyncEngine

from cityplane.storage import sqlite_url
from identity.audit import AuditLog
from identity.bruteforce import LoginThrottle
from identity.federation import Upstream
from identity.key_encryption import KeySecret
from identity.keys import KeyRing
from identity.oidc.server import HubAuthorizationServer
from identity.store import Account, IdentityStore
from identity.trust.levels import TrustPolicy
from identity.trust.password import PasswordHasher
from identity.trust.realname import RealNameAuthority
from identity.trust.realperson import FaceMatcher
from identity.trust.sms import SmsSender


@dataclass(slots=True)
class IdentitySettings:
    host: str = "127.0.0.1"
    port: int = 8070  # 0: any free port
    issuer: str | None = None  # default: http://<host>:<port>
    data_dir: Path = Path(".cityplane")
    database_url: str | None = None  # None: SQLite in <data_dir>/identity/identity.db
    redis_url: str | None = None  # shared brute-force counters between replicas
    admin_token_file: Path | None = None  # None: <data_dir>/identity-admin-token
    trust_config: dict[str, Any] | None = None  # levels: see docs/trust-levels.md
    signing_alg: str = "ES256"
    access_token_ttl: int = 600
    audiences: list[str] = field(default_factory=list)  # access tokens' aud (resource servers)
    id_token_ttl: int = 600
    refresh_token_ttl: int = 30 * 86400
    code_ttl: int = 60
    session_ttl: float = 12 * 3600.0
    key_publish_ahead: float = 600.0
    key_rotate_after: float = 30 * 86400.0
    # Encrypts the signing keys at rest (docs/adr/0020-signing-keys-encrypted-at-rest.md). None:
    # with the default SQLite, generated into <data_dir>/identity/key-secret; with a
    # database_url, keys are stored unencrypted (a warning at start).
    key_secret: KeySecret | None = None
    previous_key_secret: KeySecret | None = None  # opens keys sealed before a secret rotation
    federation: list[dict[str, Any]] = field(default_factory=list)  # upstream providers
    sms_outbox: Path | None = None  # None: <data_dir>/identity/sms-outbox.jsonl
    realname_registry: Path | None = None  # reference authority file (development)
    secure_cookies: bool | None = None  # None: when the issuer is https
    otlp_endpoint: str | None = None  # OpenTelemetry traces (OTLP/HTTP) when set
    tracer_provider: Any = None  # tests hand in an SDK provider with an in-memory exporter
    demo: bool = False  # `cityplane up`: demo accounts and clients

    def resolved_database_url(self) -> str:
        return self.database_url or sqlite_url(self.data_dir / "identity" / "identity.db")

    def resolved_admin_token_file(self) -> Path:
        return self.admin_token_file or self.data_dir / "identity-admin-token"

    def generated_key_secret_file(self) -> Path | None:
        """Where the hub keeps a key secret of its own: next to the SQLite database it owns, on
        the same disk (and in the same backups). None when the database is given by URL."""
        if self.key_secret is not None or self.database_url is not None:
            return None
        return self.data_dir / "identity" / "key-secret"


class HubMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tokens = Counter(
            "cityplane_identity_tokens_issued_total",
            "Tokens issued by grant type",
            ["grant_type"],
            registry=self.registry,
        )
        self.token_errors = Counter(
            "cityplane_identity_token_errors_total",
            "Token requests refused",
            ["grant_type", "error"],
            registry=self.registry,
        )
        self.logins = Counter(
            "cityplane_identity_verifications_total",
            "Verification attempts by method and outcome",
            ["method", "outcome"],
            registry=self.registry,
        )
        self.requests = Histogram(
            "cityplane_identity_request_duration_seconds",
            "Request duration by route",
            ["route"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(slots=True)
class Hub:
    settings: IdentitySettings
    issuer: str
    engine: AsyncEngine
    store: IdentityStore
    keys: KeyRing
    server: HubAuthorizationServer
    audit: AuditLog
    policy: TrustPolicy
    hasher: PasswordHasher
    throttle: LoginThrottle
    sms: SmsSender
    realname: RealNameAuthority
    face: FaceMatcher
    face_keys: Any
    pepper: bytes
    admin_token: str
    secure_cookies: bool
    metrics: HubMetrics = field(default_factory=HubMetrics)
    ready: bool = False
    demo: dict[str, Any] = field(default_factory=dict)  # what `seed_demo` made, for demo.json
    upstreams: dict[str, Upstream] = field(default_factory=dict)
    redis: Any = None  # when configured: sessions and login throttling
    _http: aiohttp.ClientSession | None = None

    def http(self) -> aiohttp.ClientSession:
        """One client session for calls to other servers (upstream providers, logout URIs)."""
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self._http

    def eidas(self, level: int) -> str:
        return self.policy.eidas(level)

    def userinfo(self, account: Account, scopes: list[str] | set[str]) -> dict[str, Any]:
        """Claims by scope (OIDC Core §5.4)."""
        claims: dict[str, Any] = {"sub": account.id}
        if "profile" in scopes:
            claims["name"] = account.display_name
            claims["preferred_username"] = account.username
            if account.locale:
                claims["locale"] = account.locale
            if account.real_name_verified_at:
                claims["cityplane_real_name_verified"] = True
        if "email" in scopes and account.email:
            claims["email"] = account.email
            claims["email_verified"] = False
        if "phone" in scopes and account.phone:
            claims["phone_number"] = account.phone
            claims["phone_number_verified"] = True
        return claims

    def sid(self, session_id: str) -> str:
        """The session id clients see (OIDC back-channel logout `sid`): not the cookie value."""
        return hashlib.sha256(f"sid:{session_id}".encode()).hexdigest()[:32]


HUB: Any = web.AppKey("hub", Hub) if hasattr(web, "AppKey") else "cityplane.hub"
