"""Pure functions: a CityApp's spec -> the objects that should exist (issue #5).

Nothing here talks to Kubernetes, the registry or the hub; the handlers apply what these return.
Every object carries the app's labels and a controller owner reference, so Kubernetes' garbage
collector removes them with the app. Security defaults pass the ``restricted`` Pod Security
Standard (https://kubernetes.io/docs/concepts/security/pod-security-standards/#restricted).
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import Any

from cityplane.schema import AppSpec, CityService, Metadata, ServiceSpec, Target, Upstream
from operators import naming
from operators.naming import AppRef

DEFAULT_GATEWAY_SELECTOR = {"app.kubernetes.io/component": "gateway"}
CONTAINER = "app"
# The pod template carries the OIDC secret's rotation count, so a rotation rolls the pods
# (environment variables from a Secret are read only when a container starts).
SECRET_REVISION_ANNOTATION = "cityplane.io/oidc-secret-revision"
ROTATED_FOR_ANNOTATION = "cityplane.io/rotated-for"


@dataclass(frozen=True, slots=True)
class RenderSettings:
    """Operator-wide inputs of the render functions (from the command line)."""

    gateway_namespace: str | None = None  # None: the app's own namespace
    gateway_selector: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_GATEWAY_SELECTOR))
    cluster_domain: str = "cluster.local"


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    """What lands in the app's OIDC Secret."""

    client_id: str
    client_secret: str | None  # None for a public client
    issuer: str

    @property
    def discovery_url(self) -> str:
        # OpenID Connect Discovery 1.0 §4: the issuer + /.well-known/openid-configuration
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"


def _meta(app: AppRef, name: str | None = None) -> dict[str, Any]:
    return {
        "name": name or app.name,
        "namespace": app.namespace,
        "labels": naming.labels(app),
        "ownerReferences": [naming.owner_reference(app)],
    }


def _seconds(value: float) -> int:
    # Probe fields are whole seconds, at least 1 (0 would mean "the default" to the kubelet).
    return max(1, math.ceil(value))


def _probe(path: str, spec: AppSpec) -> dict[str, Any]:
    check = spec.healthCheck
    return {
        "httpGet": {"path": path, "port": "http"},
        "initialDelaySeconds": _seconds(check.initialDelay),
        "periodSeconds": _seconds(check.period),
        "timeoutSeconds": _seconds(check.timeout),
        "failureThreshold": check.failureThreshold,
    }


def _resources(spec: AppSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if spec.resources is None:
        return out
    for kind in ("requests", "limits"):
        quantities = getattr(spec.resources, kind)
        if quantities is not None:
            values = quantities.model_dump(exclude_none=True)
            if values:
                out[kind] = values
    return out


def _identity_env(app: AppRef, spec: AppSpec) -> list[dict[str, Any]]:
    if spec.identity is None:
        return []
    keys = ["client_id", "issuer", "discovery_url"]
    if not spec.identity.publicClient:
        keys.insert(1, "client_secret")
    return [
        {
            "name": f"CITYPLANE_OIDC_{key.upper()}",
            "valueFrom": {"secretKeyRef": {"name": app.secret_name, "key": key}},
        }
        for key in keys
    ]


def render_deployment(app: AppRef, spec: AppSpec, secret_revision: int = 0) -> dict[str, Any]:
    check = spec.healthCheck
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "ports": [{"name": "http", "containerPort": spec.port, "protocol": "TCP"}],
        "env": [{"name": e.name, "value": e.value} for e in spec.env] + _identity_env(app, spec),
        "resources": _resources(spec),
        "livenessProbe": _probe(check.path, spec),
        "readinessProbe": _probe(check.readinessPath or check.path, spec),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # A read-only root filesystem still needs somewhere to write temporary files.
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    template_meta: dict[str, Any] = {"labels": naming.labels(app)}
    if spec.identity is not None:
        template_meta["annotations"] = {SECRET_REVISION_ANNOTATION: str(secret_revision)}
    deployment_spec: dict[str, Any] = {
        "selector": {"matchLabels": naming.selector(app)},
        "revisionHistoryLimit": 5,
        # Never fewer ready pods than wanted during a rollout: new pods come up first.
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
        },
        "template": {
            "metadata": template_meta,
            "spec": {
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "securityContext": {
                    "runAsNonRoot": True,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [container],
                "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
            },
        },
    }
    # With autoscaling the HPA owns `replicas`; writing it here would fight the HPA on every
    # drift check (the Kubernetes docs' "migrating deployments to horizontal autoscaling").
    if spec.autoscaling is None:
        deployment_spec["replicas"] = 1 if spec.replicas is None else spec.replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(app),
        "spec": deployment_spec,
    }


def render_service(app: AppRef, spec: AppSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(app),
        "spec": {
            "type": "ClusterIP",
            "selector": naming.selector(app),
            "ports": [{"name": "http", "port": spec.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def render_autoscaler(app: AppRef, spec: AppSpec) -> dict[str, Any] | None:
    if spec.autoscaling is None:
        return None
    scaling = spec.autoscaling
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(app),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": app.name},
            "minReplicas": scaling.minReplicas,
            "maxReplicas": scaling.maxReplicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {
                            "type": "Utilization",
                            "averageUtilization": scaling.targetCPUUtilizationPercentage,
                        },
                    },
                }
            ],
        },
    }


def render_disruption_budget(app: AppRef, spec: AppSpec) -> dict[str, Any]:
    # maxUnavailable 1 rather than minAvailable: with one replica a minAvailable budget would
    # block every node drain forever; with more, voluntary evictions go one pod at a time.
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(app),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": naming.selector(app)}},
    }


def render_network_policy(app: AppRef, spec: AppSpec, settings: RenderSettings) -> dict[str, Any]:
    """Only the gateway's pods reach the app, on its port (the gateway enforces auth, trust
    levels and rate limits, so a path around it would bypass them)."""
    namespace = settings.gateway_namespace or app.namespace
    peer = {
        "podSelector": {"matchLabels": dict(settings.gateway_selector)},
        # kubernetes.io/metadata.name is set on every namespace by the API server (1.22+).
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(app),
        "spec": {
            "podSelector": {"matchLabels": naming.selector(app)},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [peer], "ports": [{"protocol": "TCP", "port": spec.port}]}],
        },
    }


def render_workload(
    app: AppRef, spec: AppSpec, settings: RenderSettings, secret_revision: int = 0
) -> list[dict[str, Any]]:
    """The Kubernetes objects of the app's workload, in the order they are applied."""
    objects = [
        render_service(app, spec),
        render_deployment(app, spec, secret_revision),
        render_autoscaler(app, spec),
        render_disruption_budget(app, spec),
        render_network_policy(app, spec, settings),
    ]
    return [o for o in objects if o is not None]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def render_secret(
    app: AppRef, credentials: ClientCredentials, revision: int = 0, rotated_for: str | None = None
) -> dict[str, Any]:
    """The OIDC Secret. It also records which secret revision it holds and which rotation request
    it answered: read back at each reconcile, that is fresher than a status kopf may hand a
    handler late, so a rotation request is answered exactly once."""
    # `data`, not `stringData`: the API server stores only `data`, so a drift check comparing
    # what it reads back with what is wanted sees no difference when there is none.
    values = {
        "client_id": credentials.client_id,
        "issuer": credentials.issuer,
        "discovery_url": credentials.discovery_url,
    }
    if credentials.client_secret is not None:
        values["client_secret"] = credentials.client_secret
    meta = _meta(app, app.secret_name)
    meta["annotations"] = {SECRET_REVISION_ANNOTATION: str(revision)}
    if rotated_for is not None:
        meta["annotations"][ROTATED_FOR_ANNOTATION] = rotated_for
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": "Opaque",
        "data": {key: _b64(value) for key, value in values.items()},
    }


def service_url(app: AppRef, spec: AppSpec, settings: RenderSettings) -> str:
    return f"http://{app.name}.{app.namespace}.svc.{settings.cluster_domain}:{spec.port}"


def render_city_service(app: AppRef, spec: AppSpec, settings: RenderSettings) -> CityService:
    """The registry's document: the app's routes, upstream = the app's Service."""
    return CityService(
        metadata=Metadata(
            name=naming.registry_name(app),
            labels={
                naming.REGISTRY_NAMESPACE_LABEL: app.namespace,
                naming.REGISTRY_APP_LABEL: app.name,
            },
        ),
        spec=ServiceSpec(
            version=spec.version,
            lifecycle=spec.lifecycle,
            owner=naming.owner(app),
            # One target, the Service: Kubernetes' readiness probes already keep unready pods
            # out of it, so no gateway health check on top (it would eject the whole app).
            upstream=Upstream(targets=[Target(url=service_url(app, spec, settings))]),
            routes=list(spec.routes),
        ),
    )


def client_spec(app: AppRef, spec: AppSpec) -> dict[str, Any]:
    """The hub's ``ClientSpec`` (docs/identity-api.md) for the app's OIDC client."""
    assert spec.identity is not None
    identity = spec.identity
    return {
        "name": f"{app.name} ({app.namespace})",
        "redirect_uris": list(identity.redirectUris),
        "scopes": list(identity.scopes),
        "grant_types": list(identity.grantTypes),
        "public": identity.publicClient,
        "min_trust_level": identity.minTrustLevel,
        "owner": naming.owner(app),
        "post_logout_redirect_uris": list(identity.postLogoutRedirectUris),
        "backchannel_logout_uri": None,
    }


def public_url(spec: AppSpec, gateway_url: str | None) -> str | None:
    """Where citizens reach the app: the first route's host or the gateway's URL + its path."""
    route = spec.routes[0]
    path = route.match.pathPrefix or route.match.path or "/"
    if route.match.host and not route.match.host.startswith("*."):
        return f"https://{route.match.host}{path}"
    if gateway_url:
        return gateway_url.rstrip("/") + path
    return None
