"""One reconcile of a CityService resource: its spec, as written, into the registry; status.

A CityService custom resource *is* the registry's document (one schema, cityplane/schema.py), so
there is nothing to render but the name, the owner and the labels:

- registry name: ``<namespace>-<name>``, or the ``cityplane.io/registry-name`` annotation — the
  same rule as for CityApps (:func:`operators.naming.registry_name`), so one annotation means the
  same thing on both kinds;
- ``spec``: every field the author wrote, unchanged (the registry keeps documents as written, so
  defaults stay defaults); only a missing ``spec.owner`` is filled in, from the
  ``cityplane.io/owner`` annotation, else the namespace (as for CityApps);
- ``metadata.labels``: the resource's labels (the registry filters lists by them), except the
  ``cityplane.io/`` ones, which are the operator's: ``cityplane.io/namespace`` and
  ``cityplane.io/cityservice`` mark the entry as this resource's. Annotations are not copied
  (``kubectl apply`` keeps a whole copy of the object in one).

The operator writes only entries that carry its marker for this very resource: a service that
someone registered by hand, or a CityApp, or a CityService of another namespace, is never
overwritten or deleted (``Registered=False``, reason ``NameTaken``).

Like :mod:`operators.reconcile`, this file knows nothing of kopf: it answers an
:class:`~operators.reconcile.Outcome` that the handlers turn into status, events and retries.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from cityplane.client import RegistryClient, RegistryError, RegistryUnavailable
from cityplane.schema import NAME_PATTERN, CityService, Metadata, ServiceSpec
from operators import naming, status
from operators.naming import AppRef, InvalidName
from operators.reconcile import Endpoint, Outcome, SpecProblem, describe
from operators.status import Condition

# Labels on the registry entry that say which CityService resource wrote it.
REGISTRY_SERVICE_LABEL = "cityplane.io/cityservice"
RESERVED_LABEL_PREFIX = "cityplane.io/"
_REGISTRY_NAME = re.compile(NAME_PATTERN)


@dataclass(frozen=True, slots=True)
class ServiceRef:
    """What the reconcile needs to know about the CityService object itself."""

    name: str
    namespace: str
    generation: int = 1
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ServiceRef:
        meta = body["metadata"]
        return cls(
            name=meta["name"],
            namespace=meta["namespace"],
            generation=int(meta.get("generation") or 1),
            labels={str(k): str(v) for k, v in (meta.get("labels") or {}).items()},
            annotations={str(k): str(v) for k, v in (meta.get("annotations") or {}).items()},
        )

    @property
    def marker(self) -> dict[str, str]:
        """The labels that make a registry entry this resource's."""
        return {naming.REGISTRY_NAMESPACE_LABEL: self.namespace, REGISTRY_SERVICE_LABEL: self.name}


def registry_name(ref: ServiceRef) -> str:
    """``<namespace>-<name>`` or the annotation, by the CityApps' rule; refused when it is not a
    registry name (a CityService's own name may be a DNS subdomain, with dots)."""
    # AppRef carries just the identity naming.registry_name reads; one rule for both kinds.
    name = naming.registry_name(AppRef(ref.name, ref.namespace, "", annotations=ref.annotations))
    if not _REGISTRY_NAME.match(name):
        raise InvalidName(
            f"{name!r} (from namespace and name) is not a registry service name (lowercase "
            f"letters, digits and '-'); set the {naming.REGISTRY_NAME_ANNOTATION} annotation"
        )
    return name


def owner(ref: ServiceRef) -> str:
    return ref.annotations.get(naming.OWNER_ANNOTATION) or ref.namespace


def registry_labels(ref: ServiceRef) -> dict[str, str]:
    kept = {k: v for k, v in ref.labels.items() if not k.startswith(RESERVED_LABEL_PREFIX)}
    return {**kept, **ref.marker}


def render_registry_service(ref: ServiceRef, spec: Mapping[str, Any]) -> CityService:
    """The registry's document for the resource. Raises ``ValidationError`` (the spec) or
    :class:`InvalidName` — kmock, and an API server without the CRD's schema, validate nothing,
    so the schema is checked here as the registry would."""
    written = dict(spec)
    if written.get("owner") is None:
        written["owner"] = owner(ref)
    return CityService(
        metadata=Metadata(name=registry_name(ref), labels=registry_labels(ref)),
        spec=ServiceSpec.model_validate(written),
    )


def owned(entry: CityService, ref: ServiceRef) -> bool:
    labels = entry.metadata.labels
    return all(labels.get(k) == v for k, v in ref.marker.items())


def _as_written(service: CityService) -> dict[str, Any]:
    """What the registry keeps of a document: name, labels, annotations and the spec as set
    (``apiVersion``/``kind`` are constant; ``resourceVersion`` is the registry's)."""
    metadata = service.metadata
    return {
        "metadata": [metadata.name, metadata.labels, metadata.annotations],
        "spec": service.spec.model_dump(mode="json", exclude_unset=True),
    }


class ServiceReconciler:
    def __init__(self, registry: Endpoint, *, http_timeout: float = 10.0) -> None:
        self.registry = registry
        self.http_timeout = http_timeout

    def _client(self) -> RegistryClient:
        return RegistryClient(self.registry.url, self.registry.token, timeout=self.http_timeout)

    async def reconcile(self, body: Mapping[str, Any]) -> Outcome:
        ref = ServiceRef.from_body(body)
        previous: Mapping[str, Any] = body.get("status") or {}
        try:
            document = render_registry_service(ref, body.get("spec") or {})
        except (InvalidName, ValidationError) as exc:
            message = describe(exc) if isinstance(exc, ValidationError) else str(exc)
            return self._invalid(ref, previous, message)
        outcome = Outcome(status={})
        try:
            registered = await self._register(ref, document, previous, outcome)
        except SpecProblem as exc:
            return self._invalid(ref, previous, str(exc))
        conditions = [registered, _ready(registered, document)]
        outcome.status = {
            "observedGeneration": ref.generation,
            "registryName": document.metadata.name,
            "conditions": status.render_conditions(
                conditions, previous.get("conditions"), ref.generation
            ),
        }
        return outcome

    def _invalid(self, ref: ServiceRef, previous: Mapping[str, Any], message: str) -> Outcome:
        conditions = status.render_conditions(
            status.invalid(message, parts=(status.REGISTERED,)),
            previous.get("conditions"),
            ref.generation,
        )
        # The registry keeps what was last registered (the gateways go on routing it); the name
        # stays in the status so the finalizer can still remove it.
        kept = {k: v for k, v in previous.items() if k == "registryName"}
        return Outcome(
            status={**kept, "observedGeneration": ref.generation, "conditions": conditions},
            permanent=message,
            failed=["spec"],
            events=[("Warning", "InvalidSpec", message)],
        )

    async def _register(
        self,
        ref: ServiceRef,
        document: CityService,
        previous: Mapping[str, Any],
        outcome: Outcome,
    ) -> Condition:
        name = document.metadata.name
        try:
            async with self._client() as registry:
                existing = await registry.get_service(name)
                if existing is not None and not owned(existing, ref):
                    message = (
                        f"the registry already has a service {name!r} that this CityService does "
                        f"not own; set the {naming.REGISTRY_NAME_ANNOTATION} annotation to "
                        "another name"
                    )
                    outcome.transient.append(message)
                    outcome.failed.append("registry")
                    return Condition(status.REGISTERED, "False", "NameTaken", message)
                if existing is None:
                    # POST, not PUT: a name someone takes between our read and this write is a
                    # 409 (retried, then NameTaken), never overwritten.
                    stored = await registry.create_service(document)
                    outcome.events.append(
                        ("Normal", "Registered", f"registry service {name} created")
                    )
                elif _as_written(existing) != _as_written(document):
                    # If-Match: an entry changed meanwhile is a 409 and a retry, not lost.
                    stored = await registry.replace_service(
                        document, resource_version=existing.metadata.resourceVersion
                    )
                    outcome.events.append(
                        ("Normal", "Registered", f"registry service {name} updated")
                    )
                else:
                    stored = existing  # a drift check that finds nothing writes nothing
                await self._forget_renamed(registry, ref, previous, name, outcome)
        except RegistryUnavailable as exc:
            outcome.transient.append(f"registry: {exc}")
            outcome.failed.append("registry")
            return Condition(status.REGISTERED, "False", "RegistryUnavailable", str(exc))
        except RegistryError as exc:
            if exc.status in (400, 422):
                raise SpecProblem(f"the registry refused the service {name!r}: {exc}") from None
            outcome.transient.append(f"registry: {exc}")
            outcome.failed.append("registry")
            return Condition(status.REGISTERED, "False", "RegistryError", str(exc))
        return Condition(
            status.REGISTERED,
            "True",
            "Registered",
            f"registry service {name} (resourceVersion {stored.metadata.resourceVersion}), "
            f"owner {stored.spec.owner}",
        )

    async def _forget_renamed(
        self,
        registry: RegistryClient,
        ref: ServiceRef,
        previous: Mapping[str, Any],
        name: str,
        outcome: Outcome,
    ) -> None:
        """The registry-name annotation changed: the entry under the old name is this
        resource's no more (two entries would route the same paths twice)."""
        old = previous.get("registryName")
        if not isinstance(old, str) or old == name:
            return
        existing = await registry.get_service(old)
        if existing is not None and owned(existing, ref):
            await registry.delete_service(old, resource_version=existing.metadata.resourceVersion)
            outcome.events.append(
                ("Normal", "Deregistered", f"registry service {old} deleted: renamed to {name}")
            )

    async def finalize(self, body: Mapping[str, Any]) -> list[str]:
        """Remove the registry entry when it is this resource's. Raises the registry's errors
        (the caller retries)."""
        ref = ServiceRef.from_body(body)
        name = (body.get("status") or {}).get("registryName")
        if not isinstance(name, str):
            try:
                name = registry_name(ref)
            except InvalidName:
                return []  # never registered: nothing to remove
        async with self._client() as registry:
            existing = await registry.get_service(name)
            if existing is None or not owned(existing, ref):
                return []
            await registry.delete_service(name, resource_version=existing.metadata.resourceVersion)
        return [f"registry service {name} deleted"]


def _ready(registered: Condition, document: CityService) -> Condition:
    if not registered.ok:
        return status.ready([registered])
    lifecycle = document.spec.lifecycle
    if lifecycle in ("published", "deprecated"):
        message = (
            f"{len(document.spec.routes)} route(s) registered; gateways route them via the "
            "registry's watch"
        )
    else:
        # Ready: the operator has done all it can; the lifecycle is the author's choice.
        message = f"registered; not routed while the lifecycle is {lifecycle}"
    return Condition(status.READY, "True", "Registered", message)
