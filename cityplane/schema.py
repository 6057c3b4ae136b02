"""The one schema of a city service.

Every part reads services through these models: the gateway's config files, the registry's
API (later), `cityplane apply` files and the Kubernetes CRDs (whose ``openAPIV3Schema`` is
generated from :func:`service_json_schema`). Field names are camelCase, Kubernetes style, as
``ARCHITECTURE.md`` fixes them. Unknown fields are rejected everywhere.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
    model_validator,
)

API_VERSION = "cityplane.io/v1alpha1"

MIN_DURATION = 0.001
MAX_DURATION = 10 * 365 * 24 * 3600.0  # ten years: anything longer is a typo
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Accept ``250ms``, ``1s``, ``1.5s``, ``2m``, ``1h`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration like '1s', '250ms' or '2m' is required")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration (use e.g. '1s', '250ms', '2m')")
    if not math.isfinite(seconds) or not MIN_DURATION <= seconds <= MAX_DURATION:
        raise ValueError(f"a duration must be between 1ms and {MAX_DURATION:.0f}s")
    return seconds


def _format_duration(seconds: float) -> str:
    """The shortest text that reads back as (nearly, to the µs) the same duration."""
    ms = seconds * 1000
    if seconds < 1 and abs(ms - round(ms)) < 1e-6:
        return f"{round(ms)}ms"
    return f"{seconds:.6f}".rstrip("0").rstrip(".") + "s"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(_format_duration, return_type=str, when_used="json"),
    Field(json_schema_extra={"type": "string", "pattern": _DURATION.pattern}),
]


def duration_default(text: str, description: str | None = None) -> Any:
    """A Duration field's default, written as text so the JSON Schema (and the CRD generated
    from it) shows ``"5s"`` rather than ``5.0``; validated into seconds like any input."""
    return Field(default=text, validate_default=True, description=description)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# --- upstream -------------------------------------------------------------------------------


class Target(Strict):
    url: str = Field(description="Base URL of one upstream instance, http:// or https://.")
    weight: int = Field(default=1, ge=0, le=1000)

    @field_validator("url")
    @classmethod
    def _url_is_http(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL with a host")
        if parts.query or parts.fragment:
            raise ValueError("a target URL takes no query or fragment")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"{url!r} has an invalid port") from exc
        return url


class HealthCheck(Strict):
    path: str = "/healthz"
    interval: Duration = duration_default("5s")
    timeout: Duration = duration_default("1s")
    healthyThreshold: int = Field(default=2, ge=1, le=100)
    unhealthyThreshold: int = Field(default=3, ge=1, le=100)
    # Passive checks (Envoy's outlier detection): consecutive failures of real traffic eject a
    # target for `ejectionTime`; active checks (or the ejection timer) bring it back.
    passiveFailures: int = Field(default=5, ge=0, le=1000, description="0 disables passive checks")
    ejectionTime: Duration = duration_default("30s")
    active: bool = True

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError("must start with '/'")
        return path


class Timeouts(Strict):
    connect: Duration = duration_default("1s")
    request: Duration = duration_default("10s")


class Retries(Strict):
    attempts: int = Field(default=2, ge=0, le=10, description="extra attempts, idempotent only")
    # Envoy-style retry budget: retries may add at most this share of the active requests.
    budgetPercent: float = Field(default=20.0, ge=0, le=100)
    minRetryConcurrency: int = Field(default=3, ge=0)


class CircuitBreaker(Strict):
    failureThreshold: int = Field(default=5, ge=1, le=100_000)
    resetTimeout: Duration = duration_default("10s")


LoadBalancing = Literal["round-robin", "least-request", "consistent-hash"]


class InstancePolicy(Strict):
    """Instances register themselves with the registry and heartbeat (Consul/Nacos style)."""

    ttl: Duration = duration_default("15s", "missed heartbeats this long: unhealthy")
    removeAfter: Duration = duration_default("60s", "missed heartbeats this long: removed")

    @model_validator(mode="after")
    def _remove_after_ttl(self) -> InstancePolicy:
        if self.removeAfter <= self.ttl:
            raise ValueError("removeAfter must be longer than ttl")
        return self


class Upstream(Strict):
    targets: list[Target] = Field(
        default_factory=list,
        description="static targets; at least one unless `instances` is set",
    )
    loadBalancing: LoadBalancing = "round-robin"
    hashOn: str = Field(
        default="ip",
        description="consistent-hash key: 'ip', 'header:<name>' or 'cookie:<name>'",
    )
    healthCheck: HealthCheck | None = None
    timeouts: Timeouts = Timeouts()
    retries: Retries = Retries()
    circuitBreaker: CircuitBreaker | None = CircuitBreaker()
    instances: InstancePolicy | None = Field(
        default=None, description="let instances register themselves with a TTL heartbeat"
    )

    @model_validator(mode="after")
    def _some_targets(self) -> Upstream:
        if not self.targets and self.instances is None:
            raise ValueError(
                "targets must list at least one target unless instances is set "
                "(instances register themselves)"
            )
        return self

    @field_validator("hashOn")
    @classmethod
    def _hash_on(cls, value: str) -> str:
        if value == "ip" or re.fullmatch(r"(header|cookie):[A-Za-z0-9!#$%&'*+.^_`|~-]+", value):
            return value
        raise ValueError("must be 'ip', 'header:<name>' or 'cookie:<name>'")


# --- routes ---------------------------------------------------------------------------------

Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_HOST = re.compile(r"^(\*\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*(:\d+)?$")


class Match(Strict):
    pathPrefix: str | None = None
    path: str | None = Field(default=None, description="exact path; wins over any prefix")
    methods: list[Method] | None = None
    host: str | None = Field(default=None, description="exact host or '*.example.org'")

    @field_validator("pathPrefix", "path")
    @classmethod
    def _clean_path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        segments = value.split("/")
        if any(s in (".", "..") for s in segments) or "//" in value or "%" in value:
            raise ValueError("must be a normalized path (no '.', '..', '//' or '%')")
        return value

    @field_validator("host")
    @classmethod
    def _valid_host(cls, value: str | None) -> str | None:
        if value is not None and not _HOST.match(value):
            raise ValueError(f"{value!r} is not a host name")
        return value.lower() if value else value

    @model_validator(mode="after")
    def _one_path(self) -> Match:
        if (self.pathPrefix is None) == (self.path is None):
            raise ValueError("give exactly one of 'pathPrefix' or 'path'")
        return self


class Auth(Strict):
    required: bool = True
    scopes: list[str] = []
    # 0: any valid token, a machine's too (client-credentials tokens carry no acr); 1-4: a
    # person who verified that much (ARCHITECTURE.md, "Trust levels").
    minTrustLevel: int = Field(default=1, ge=0, le=4)
    maxAge: Duration | None = None


_RATE_KEY = re.compile(r"^(consumer|ip|route|header:[A-Za-z0-9!#$%&'*+.^_`|~-]+)$")


class RateLimit(Strict):
    requests: int = Field(ge=1, le=10_000_000)
    window: Duration
    key: str = "consumer"
    onStoreError: Literal["open", "closed", "local"] = "open"

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        if not _RATE_KEY.match(value):
            raise ValueError("must be 'consumer', 'ip', 'route' or 'header:<name>'")
        return value


class Route(Strict):
    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
    match: Match
    stripPrefix: bool = False
    auth: Auth | None = None
    rateLimit: RateLimit | None = None


# --- the document ---------------------------------------------------------------------------

Lifecycle = Literal["draft", "published", "deprecated", "retired"]
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


class Metadata(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    # Set by the registry (optimistic concurrency, like Kubernetes); ignored in files.
    resourceVersion: str | None = None


class ServiceSpec(Strict):
    version: str = Field(default="v1", pattern=r"^v\d+([a-z0-9]+)?$")
    lifecycle: Lifecycle = "published"
    sunset: datetime | None = Field(default=None, description="RFC 8594 Sunset, when deprecated")
    deprecatedSince: datetime | None = None
    owner: str | None = None
    upstream: Upstream
    routes: list[Route] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_route_names(self) -> ServiceSpec:
        names = [r.name for r in self.routes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"route names must be unique, repeated: {', '.join(dupes)}")
        return self


class CityService(Strict):
    apiVersion: Literal["cityplane.io/v1alpha1"] = "cityplane.io/v1alpha1"
    kind: Literal["CityService"] = "CityService"
    metadata: Metadata
    spec: ServiceSpec


def service_json_schema() -> dict[str, Any]:
    """JSON Schema of the document; the CRD generator and the registry's OpenAPI use it."""
    return CityService.model_json_schema(by_alias=True)


# --- CityApp: a workload plugged into the city (ARCHITECTURE.md, issue #5) --------------------
# The same `routes` as a CityService, a workload instead of `upstream` (the operator derives the
# upstream from the app's Kubernetes Service) and an `identity` block for its OIDC client.

_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
# A Kubernetes resource quantity (`100m`, `0.5`, `128Mi`, `1G`); the API server parses it.
_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|Pi|Ei|M|G|T|P|E)?$"
# An OCI image reference: [registry[:port]/]path[:tag][@digest], lowercase path.
_IMAGE = (
    r"^[a-z0-9]+([._:/-][a-z0-9]+)*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$"
)
GrantType = Literal["authorization_code", "refresh_token", "client_credentials"]


class Autoscaling(Strict):
    """A HorizontalPodAutoscaler (autoscaling/v2) on CPU utilization."""

    minReplicas: int = Field(default=1, ge=1, le=1000)
    maxReplicas: int = Field(ge=1, le=1000)
    targetCPUUtilizationPercentage: int = Field(default=80, ge=1, le=100)

    @model_validator(mode="after")
    def _min_below_max(self) -> Autoscaling:
        if self.minReplicas > self.maxReplicas:
            raise ValueError("minReplicas must not be greater than maxReplicas")
        return self


class EnvVar(Strict):
    name: str = Field(pattern=_ENV_NAME)
    value: str = ""


class Quantities(Strict):
    cpu: str | None = Field(default=None, pattern=_QUANTITY)
    memory: str | None = Field(default=None, pattern=_QUANTITY)


class Resources(Strict):
    requests: Quantities | None = None
    limits: Quantities | None = None


class Probes(Strict):
    """The app's liveness and readiness probes (HTTP GET on the app's port)."""

    path: str = Field(default="/healthz", description="liveness probe path")
    readinessPath: str | None = Field(default=None, description="default: the liveness path")
    initialDelay: Duration = duration_default("1s")
    period: Duration = duration_default("10s")
    timeout: Duration = duration_default("1s")
    failureThreshold: int = Field(default=3, ge=1, le=100)

    @field_validator("path", "readinessPath")
    @classmethod
    def _absolute(cls, path: str | None) -> str | None:
        if path is not None and not path.startswith("/"):
            raise ValueError("must start with '/'")
        return path


def _default_grants() -> list[GrantType]:
    return ["authorization_code", "refresh_token"]


class AppIdentity(Strict):
    """The app's OIDC client at the identity hub (docs/identity-api.md, ClientSpec)."""

    redirectUris: list[str] = []
    scopes: list[str] = Field(default_factory=lambda: ["openid"])
    grantTypes: list[GrantType] = Field(default_factory=_default_grants, min_length=1)
    publicClient: bool = Field(default=False, description="no secret (browser or mobile app)")
    minTrustLevel: int = Field(default=1, ge=1, le=4, description="lowest acr level it accepts")
    postLogoutRedirectUris: list[str] = []

    @field_validator("redirectUris", "postLogoutRedirectUris")
    @classmethod
    def _redirects(cls, uris: list[str]) -> list[str]:
        for uri in uris:
            parts = urlsplit(uri)
            # OAuth 2.0 Security BCP (RFC 9700 §2.1): exact https redirect URIs; plain http
            # only for loopback (RFC 8252 §7.3); never a fragment (RFC 6749 §3.1.2).
            loopback = parts.hostname in ("localhost", "127.0.0.1", "::1")
            if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
                raise ValueError(f"{uri!r}: redirect URIs must be https (http only for loopback)")
            if not parts.hostname or parts.fragment:
                raise ValueError(f"{uri!r}: a redirect URI needs a host and no fragment")
        return uris

    @model_validator(mode="after")
    def _public_clients(self) -> AppIdentity:
        if self.publicClient and "client_credentials" in self.grantTypes:
            raise ValueError("a public client cannot use the client_credentials grant")
        if "authorization_code" in self.grantTypes and not self.redirectUris:
            raise ValueError("the authorization_code grant needs at least one redirect URI")
        return self


class AppSpec(Strict):
    image: str = Field(pattern=_IMAGE, max_length=512)
    replicas: int | None = Field(default=None, ge=0, le=1000, description="default 1")
    autoscaling: Autoscaling | None = None
    port: int = Field(default=8080, ge=1, le=65535)
    env: list[EnvVar] = Field(default=[], max_length=256)
    resources: Resources | None = None
    healthCheck: Probes = Field(default_factory=Probes)
    version: str = Field(default="v1", pattern=r"^v\d+([a-z0-9]+)?$")
    lifecycle: Lifecycle = "published"
    routes: list[Route] = Field(min_length=1, max_length=64)
    identity: AppIdentity | None = None

    @model_validator(mode="after")
    def _checks(self) -> AppSpec:
        if self.replicas is not None and self.autoscaling is not None:
            raise ValueError("give either replicas or autoscaling, not both")
        names = [r.name for r in self.routes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"route names must be unique, repeated: {', '.join(dupes)}")
        envs = [e.name for e in self.env]
        dupes = sorted({n for n in envs if envs.count(n) > 1})
        if dupes:
            raise ValueError(f"env names must be unique, repeated: {', '.join(dupes)}")
        return self


class CityApp(Strict):
    apiVersion: Literal["cityplane.io/v1alpha1"] = "cityplane.io/v1alpha1"
    kind: Literal["CityApp"] = "CityApp"
    metadata: Metadata
    spec: AppSpec


def app_json_schema() -> dict[str, Any]:
    """JSON Schema of a CityApp; the CityApp CRD is generated from it."""
    return CityApp.model_json_schema(by_alias=True)
