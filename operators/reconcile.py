"""One reconcile of a CityApp: workload, OIDC client + Secret, registry entry, status.

Level-based and idempotent: it computes what should be from the spec (operators/render.py),
makes it so, and reports each part as a condition. The kopf handlers (operators/handlers.py)
only turn its :class:`Outcome` into a status patch, events and kopf's retry errors, so this
file knows nothing of kopf.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from cityplane.client import RegistryClient, RegistryError, RegistryUnavailable
from cityplane.schema import AppSpec
from operators import naming, render, status
from operators.hub import HubClient, HubError, HubUnavailable
from operators.kube import KubeError, KubeObjects
from operators.naming import AppRef, InvalidName
from operators.status import Condition

EventType = Literal["Normal", "Warning"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A server the operator calls: its URL and the bearer token for its admin API (read from
    its file at each use, so a rotated token in a mounted Secret is picked up)."""

    url: str
    token_value: str | None = None
    token_file: Path | None = None

    @property
    def token(self) -> str | None:
        if self.token_file is not None:
            try:
                return self.token_file.read_text(encoding="utf-8").strip() or None
            except OSError:
                return None  # answered as 401 by the server: reported, retried
        return self.token_value


@dataclass(frozen=True, slots=True)
class Dependencies:
    kube: KubeObjects
    registry: Endpoint
    hub: Endpoint
    render: render.RenderSettings = field(default_factory=render.RenderSettings)
    gateway_url: str | None = None
    http_timeout: float = 10.0


@dataclass(slots=True)
class Outcome:
    """What one reconcile found; ``permanent`` / ``transient`` say whether (and how) to retry."""

    status: dict[str, Any]
    permanent: str | None = None  # the spec cannot work: no retry until it changes
    transient: list[str] = field(default_factory=list)  # a dependency failed: retry later
    failed: list[str] = field(default_factory=list)  # which dependencies ("kubernetes", …)
    events: list[tuple[EventType, str, str]] = field(default_factory=list)


class SpecProblem(Exception):
    """A part of the spec that a dependency refused for good (e.g. the registry's 422)."""


def describe(exc: ValidationError) -> str:
    """pydantic's errors as one line a person can act on: ``spec.port: … ; spec.routes.0…``."""
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(p) for p in ("spec", *error["loc"]))
        parts.append(f"{where}: {error['msg']}")
    return "invalid spec: " + "; ".join(parts)


def _decoded(secret: Mapping[str, Any] | None, key: str) -> str | None:
    value = ((secret or {}).get("data") or {}).get(key)
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value).decode()
    except ValueError:
        return None


class AppReconciler:
    def __init__(self, deps: Dependencies) -> None:
        self.deps = deps

    # --- the whole ------------------------------------------------------------------------

    async def reconcile(self, body: Mapping[str, Any]) -> Outcome:
        app = AppRef.from_body(body)
        previous: Mapping[str, Any] = body.get("status") or {}
        try:
            app.check()
            spec = AppSpec.model_validate(body.get("spec") or {})
        except (InvalidName, ValidationError) as exc:
            message = describe(exc) if isinstance(exc, ValidationError) else str(exc)
            return self._invalid(app, previous, message)

        outcome = Outcome(status={})
        state = dict(previous.get("identity") or {})
        try:
            identity, state = await self._identity(app, spec, state, outcome)
        except SpecProblem as exc:
            return self._invalid(app, previous, str(exc))
        try:
            workload = await self._workload(app, spec, int(state.get("secretRevision", 0)))
        except KubeError as exc:
            if not exc.transient:
                return self._invalid(app, previous, f"Kubernetes refused an object: {exc}")
            outcome.transient.append(f"Kubernetes: {exc}")
            outcome.failed.append("kubernetes")
            workload = Condition(status.WORKLOAD, "False", "KubernetesError", str(exc))
        try:
            registered, routes = await self._register(app, spec, outcome)
        except SpecProblem as exc:
            return self._invalid(app, previous, str(exc))

        parts = [workload, routes, identity, registered]
        outcome.status = {
            "observedGeneration": app.generation,
            "conditions": status.render_conditions(
                [*parts, status.ready(parts)], previous.get("conditions"), app.generation
            ),
            "identity": state,
            "registryName": naming.registry_name(app),
        }
        if url := render.public_url(spec, self.deps.gateway_url):
            outcome.status["url"] = url
        return outcome

    def _invalid(self, app: AppRef, previous: Mapping[str, Any], message: str) -> Outcome:
        conditions = status.render_conditions(
            status.invalid(message), previous.get("conditions"), app.generation
        )
        kept = {k: v for k, v in previous.items() if k in ("identity", "registryName")}
        return Outcome(
            status={**kept, "observedGeneration": app.generation, "conditions": conditions},
            permanent=message,
            failed=["spec"],
            events=[("Warning", "InvalidSpec", message)],
        )

    # --- the workload ---------------------------------------------------------------------

    async def _workload(self, app: AppRef, spec: AppSpec, secret_revision: int) -> Condition:
        objects = render.render_workload(app, spec, self.deps.render, secret_revision)
        if spec.autoscaling is None:
            # An autoscaler left from an earlier spec would keep scaling the Deployment.
            await asyncio.to_thread(
                self.deps.kube.delete,
                "autoscaling/v2",
                "HorizontalPodAutoscaler",
                app.namespace,
                app.name,
            )
        deployment: dict[str, Any] = {}
        for wanted in objects:
            applied = await asyncio.to_thread(self.deps.kube.apply, wanted)
            if applied.kind == "Deployment":
                deployment = applied.live
        return workload_condition(deployment, spec)

    # --- the OIDC client ------------------------------------------------------------------

    async def _identity(
        self, app: AppRef, spec: AppSpec, state: dict[str, Any], outcome: Outcome
    ) -> tuple[Condition, dict[str, Any]]:
        try:
            return await self._provision(app, spec, state, outcome)
        except (HubUnavailable, HubError) as exc:
            if isinstance(exc, HubError) and not exc.transient:
                raise SpecProblem(f"the identity hub refused the OIDC client: {exc}") from None
            outcome.transient.append(f"identity hub: {exc}")
            outcome.failed.append("identity")
            reason = "HubUnavailable" if isinstance(exc, HubUnavailable) else "HubError"
            return Condition(status.IDENTITY, "False", reason, str(exc)), state
        except KubeError as exc:
            outcome.transient.append(f"Kubernetes: {exc}")
            outcome.failed.append("kubernetes")
            return Condition(status.IDENTITY, "False", "KubernetesError", str(exc)), state

    async def _provision(
        self, app: AppRef, spec: AppSpec, state: dict[str, Any], outcome: Outcome
    ) -> tuple[Condition, dict[str, Any]]:
        kube, hub_at = self.deps.kube, self.deps.hub
        if spec.identity is None:
            if state.get("clientId"):
                async with HubClient(
                    hub_at.url, hub_at.token, timeout=self.deps.http_timeout
                ) as hub:
                    await hub.delete_client(str(state["clientId"]))
                await asyncio.to_thread(kube.delete, "v1", "Secret", app.namespace, app.secret_name)
                outcome.events.append(
                    ("Normal", "ClientDeleted", "the spec asks for no OIDC client")
                )
            message = "the spec asks for no OIDC client"
            return Condition(status.IDENTITY, "True", "NotRequested", message), {}

        cid = naming.client_id(app)
        wanted_rotation = app.annotations.get(naming.ROTATE_ANNOTATION)
        async with HubClient(hub_at.url, hub_at.token, timeout=self.deps.http_timeout) as hub:
            issuer = await hub.issuer()
            written = await hub.put_client(cid, render.client_spec(app, spec))
            live = await asyncio.to_thread(kube.get, "v1", "Secret", app.namespace, app.secret_name)
            kept = _decoded(live, "client_secret")
            # What the Secret says it holds wins over the status (kopf may hand us an older one).
            noted = ((live or {}).get("metadata") or {}).get("annotations") or {}
            revision = _int(
                noted.get(render.SECRET_REVISION_ANNOTATION), state.get("secretRevision")
            )
            rotated_for = noted.get(render.ROTATED_FOR_ANNOTATION, state.get("rotatedFor"))
            secret: str | None = None
            if spec.identity.publicClient:
                pass  # a public client has no secret (RFC 6749 §2.1)
            elif written.client_secret:
                secret, revision = written.client_secret, revision + 1
                outcome.events.append(("Normal", "ClientCreated", f"OIDC client {cid} created"))
            elif kept is None:
                # The hub shows a secret only once; with the Secret gone the only way back to
                # working credentials is a new secret.
                secret, revision = await hub.rotate_secret(cid), revision + 1
                outcome.events.append(
                    ("Normal", "SecretRotated", f"new secret for {cid}: its Secret was missing")
                )
            elif wanted_rotation is not None and wanted_rotation != rotated_for:
                secret, revision = await hub.rotate_secret(cid), revision + 1
                outcome.events.append(
                    ("Normal", "SecretRotated", f"secret of {cid} rotated on request")
                )
            else:
                secret = kept
        credentials = render.ClientCredentials(cid, secret, issuer)
        await asyncio.to_thread(
            kube.apply, render.render_secret(app, credentials, revision, wanted_rotation)
        )
        new_state: dict[str, Any] = {"clientId": cid, "secretRevision": revision}
        if wanted_rotation is not None:
            new_state["rotatedFor"] = wanted_rotation
        message = f"OIDC client {cid} at {issuer}; credentials in Secret {app.secret_name}"
        return Condition(status.IDENTITY, "True", "Provisioned", message), new_state

    # --- the registry ---------------------------------------------------------------------

    async def _register(
        self, app: AppRef, spec: AppSpec, outcome: Outcome
    ) -> tuple[Condition, Condition]:
        document = render.render_city_service(app, spec, self.deps.render)
        name = document.metadata.name
        at = self.deps.registry
        try:
            async with RegistryClient(at.url, at.token, timeout=self.deps.http_timeout) as registry:
                existing = await registry.get_service(name)
                if existing is not None and not _ours(existing.metadata.labels, app):
                    message = (
                        f"the registry already has a service {name!r} that this CityApp does not "
                        f"own; set the {naming.REGISTRY_NAME_ANNOTATION} annotation to another name"
                    )
                    outcome.transient.append(message)
                    outcome.failed.append("registry")
                    return (
                        Condition(status.REGISTERED, "False", "NameTaken", message),
                        Condition(status.ROUTES, "False", "NameTaken", message),
                    )
                stored = await registry.replace_service(document)
        except RegistryUnavailable as exc:
            outcome.transient.append(f"registry: {exc}")
            outcome.failed.append("registry")
            failed = Condition(status.REGISTERED, "False", "RegistryUnavailable", str(exc))
            return failed, Condition(status.ROUTES, "Unknown", "RegistryUnavailable", str(exc))
        except RegistryError as exc:
            if exc.status in (400, 422):
                raise SpecProblem(f"the registry refused the service {name!r}: {exc}") from None
            outcome.transient.append(f"registry: {exc}")
            outcome.failed.append("registry")
            failed = Condition(status.REGISTERED, "False", "RegistryError", str(exc))
            return failed, Condition(status.ROUTES, "Unknown", "RegistryError", str(exc))
        version = stored.metadata.resourceVersion
        registered = Condition(
            status.REGISTERED,
            "True",
            "Registered",
            f"registry service {name} (resourceVersion {version}), owner {naming.owner(app)}",
        )
        count = f"{len(spec.routes)} route(s)"
        if spec.lifecycle in ("published", "deprecated"):
            routes = Condition(
                status.ROUTES,
                "True",
                "Accepted",
                f"{count} of {name} accepted; gateways route them via the registry's watch",
            )
        else:
            routes = Condition(
                status.ROUTES,
                "False",
                spec.lifecycle.capitalize(),
                f"{count} registered but not routed: the lifecycle is {spec.lifecycle}",
            )
        return registered, routes

    # --- deletion -------------------------------------------------------------------------

    async def finalize(self, body: Mapping[str, Any]) -> list[str]:
        """Remove the registry entry and the OIDC client; the Kubernetes children go with
        their owner (garbage collection). Raises the dependency errors (the caller retries)."""
        app = AppRef.from_body(body)
        previous: Mapping[str, Any] = body.get("status") or {}
        done = []
        name = previous.get("registryName")
        if isinstance(name, str):
            at = self.deps.registry
            async with RegistryClient(at.url, at.token, timeout=self.deps.http_timeout) as registry:
                existing = await registry.get_service(name)
                if existing is not None and _ours(existing.metadata.labels, app):
                    await registry.delete_service(name)
                    done.append(f"registry service {name} deleted")
        cid = (previous.get("identity") or {}).get("clientId")
        if isinstance(cid, str):
            hub_at = self.deps.hub
            async with HubClient(hub_at.url, hub_at.token, timeout=self.deps.http_timeout) as hub:
                if await hub.delete_client(cid):
                    done.append(f"OIDC client {cid} deleted")
        return done


def _int(*candidates: Any) -> int:
    for candidate in candidates:
        try:
            return int(candidate)
        except (TypeError, ValueError):
            continue
    return 0


def _ours(labels: Mapping[str, str], app: AppRef) -> bool:
    return (
        labels.get(naming.REGISTRY_NAMESPACE_LABEL) == app.namespace
        and labels.get(naming.REGISTRY_APP_LABEL) == app.name
    )


def workload_condition(deployment: Mapping[str, Any], spec: AppSpec) -> Condition:
    """WorkloadReady from the Deployment's status, as the deployment controller reports it."""
    wanted = (
        spec.autoscaling.minReplicas
        if spec.autoscaling
        else (1 if spec.replicas is None else spec.replicas)
    )
    live = deployment.get("status") or {}
    generation = (deployment.get("metadata") or {}).get("generation") or 0
    ready = int(live.get("readyReplicas") or 0)
    updated = int(live.get("updatedReplicas") or 0)
    seen = int(live.get("observedGeneration") or 0) >= int(generation)
    if wanted == 0:
        return Condition(status.WORKLOAD, "True", "ScaledToZero", "replicas is 0")
    text = f"{ready}/{wanted} pods ready"
    if seen and ready >= wanted and updated >= wanted:
        return Condition(status.WORKLOAD, "True", "Available", text)
    return Condition(status.WORKLOAD, "False", "Progressing", text + ", rollout in progress")
