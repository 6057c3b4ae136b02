"""The kopf handlers: thin glue from kopf's causes to :class:`AppReconciler` (CityApps) and
:class:`ServiceReconciler` (CityServices) and back.

For each kind, create/update/resume and a drift timer run the same level-based reconcile; delete
runs the finalizer (kopf adds ``cityplane.io/finalizer`` because a delete handler exists). An
invalid spec raises ``kopf.PermanentError`` (no retry until the spec changes); a dependency
outage raises ``kopf.TemporaryError`` with an exponential backoff. Status is written through
kopf's ``patch`` in both cases, so ``kubectl get cityapps`` (or ``cityservices``) says what is
wrong while kopf retries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from cityplane.client import RegistryError, RegistryUnavailable
from operators.hub import HubError, HubUnavailable
from operators.metrics import OperatorMetrics
from operators.reconcile import AppReconciler, Outcome
from operators.services import ServiceReconciler

RESOURCE = ("cityplane.io", "v1alpha1", "cityapps")
SERVICES = ("cityplane.io", "v1alpha1", "cityservices")
FINALIZER = "cityplane.io/finalizer"
Login = Callable[..., kopf.ConnectionInfo | None]


@dataclass(frozen=True, slots=True)
class Timing:
    drift_interval: float = 60.0  # seconds between level-based re-applies of each CityApp
    retry_delay: float = 2.0  # first delay after a transient failure; doubles up to the max
    max_retry_delay: float = 300.0


def backoff(retry: int, timing: Timing) -> float:
    return min(timing.max_retry_delay, timing.retry_delay * 2 ** min(retry, 16))


def _status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch from ``old`` status to ``new``: keys that went away become null (a merge
    patch keeps what it does not mention), nested one level (``identity``)."""
    # Unchanged keys are left out: a drift check that finds nothing writes nothing (no new
    # resourceVersion, no watch event for every client of the API server).
    out: dict[str, Any] = {k: v for k, v in new.items() if old.get(k) != v}
    for key, value in old.items():
        if key in ("kopf",):
            continue  # kopf's own progress records
        if key not in new:
            out[key] = None
        elif key in out and isinstance(value, Mapping) and isinstance(new[key], Mapping):
            out[key] = {**{k: None for k in value if k not in new[key]}, **new[key]}
    return out


def build_registry(
    reconciler: AppReconciler,
    metrics: OperatorMetrics,
    timing: Timing,
    login: Login,
    services: ServiceReconciler | None = None,
) -> kopf.OperatorRegistry:
    """A kopf registry with the CityApp and CityService handlers (its own: several operators
    can share a process, as the tests do). ``services`` defaults to a reconciler for the
    CityApps' registry."""
    registry = kopf.OperatorRegistry()
    locks: dict[str, asyncio.Lock] = {}
    if services is None:
        services = ServiceReconciler(
            reconciler.deps.registry, http_timeout=reconciler.deps.http_timeout
        )

    def lock_for(body: Mapping[str, Any]) -> asyncio.Lock:
        # A timer and a change handler of one object may overlap in kopf; they must not
        # reconcile it at the same time (two rotations, two Secrets). Keyed by kind too: a
        # CityApp and a CityService may share a name.
        meta = body["metadata"]
        key = f"{body.get('kind')}/{meta.get('namespace')}/{meta.get('name')}"
        return locks.setdefault(key, asyncio.Lock())

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.posting.level = logging.INFO
        # A watch the API server closes after at most this long is re-opened: a silently
        # dead stream cannot stop the operator for long (kopf#787, kopf#1276).
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330

    @kopf.on.login(registry=registry)
    def authenticate(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return login(**kwargs)

    async def run(
        handler: str,
        body: kopf.Body,
        patch: kopf.Patch,
        reconcile_one: Callable[[Mapping[str, Any]], Awaitable[Outcome]] = reconciler.reconcile,
    ) -> Outcome:
        started = time.monotonic()
        async with lock_for(body):
            outcome = await reconcile_one(body)
        previous = body.get("status") or {}
        changes = _status_patch(previous, outcome.status)
        if changes:
            patch.status.update(changes)
        events = outcome.events
        if outcome.permanent and "conditions" not in changes:
            events = []  # the same invalid spec again (a timer, a resume): said once is enough
        for type_, reason, message in events:
            kopf.event(body, type=type_, reason=reason, message=message)
        result = "invalid" if outcome.permanent else "retry" if outcome.transient else "ok"
        metrics.observe(handler, result, time.monotonic() - started, outcome.failed)
        return outcome

    # Stable handler ids: kopf keys its progress records (annotations, status.kopf) by them.
    @kopf.on.resume(*RESOURCE, id="reconcile", registry=registry)
    @kopf.on.create(*RESOURCE, id="reconcile", registry=registry)
    @kopf.on.update(*RESOURCE, id="reconcile", registry=registry)
    async def reconcile(
        body: kopf.Body, patch: kopf.Patch, retry: int, reason: str, **_: Any
    ) -> None:
        outcome = await run(str(reason), body, patch)
        if outcome.permanent:
            raise kopf.PermanentError(outcome.permanent)
        if outcome.transient:
            delay = backoff(retry, timing)
            kopf.warn(body, reason="Retrying", message="; ".join(outcome.transient))
            raise kopf.TemporaryError("; ".join(outcome.transient), delay=delay)
        if str(reason) != "resume":
            kopf.info(body, reason="Reconciled", message="workload, routes and identity applied")

    @kopf.timer(
        *RESOURCE,
        id="drift",
        interval=timing.drift_interval,
        initial_delay=timing.drift_interval,
        registry=registry,
    )
    async def drift(body: kopf.Body, patch: kopf.Patch, **kwargs: Any) -> None:
        """Level-based correction: re-apply what should be (someone edited a child, the registry
        lost the entry) and refresh WorkloadReady from the Deployment's status."""
        retry = int(kwargs.get("retry") or 0)
        outcome = await run("timer", body, patch)
        if outcome.transient and not outcome.permanent:
            raise kopf.TemporaryError("; ".join(outcome.transient), delay=backoff(retry, timing))

    @kopf.on.delete(*RESOURCE, id="cleanup", registry=registry)
    async def finalize(body: kopf.Body, retry: int, **_: Any) -> None:
        started = time.monotonic()
        try:
            done = await reconciler.finalize(body)
        except (RegistryUnavailable, RegistryError, HubUnavailable, HubError) as exc:
            dependency = (
                "registry" if isinstance(exc, RegistryUnavailable | RegistryError) else ("identity")
            )
            metrics.observe("delete", "retry", time.monotonic() - started, [dependency])
            raise kopf.TemporaryError(
                f"cannot clean up yet ({dependency}): {exc}", delay=backoff(retry, timing)
            ) from None
        metrics.observe("delete", "ok", time.monotonic() - started, [])
        for line in done:
            meta = body["metadata"]
            logging.getLogger(__name__).info("%s/%s: %s", meta["namespace"], meta["name"], line)

    # --- CityService: the registry's document as a resource (operators/services.py) ---------
    # Metrics label these handlers "cityservice-<cause>", next to the CityApps' "<cause>".

    @kopf.on.resume(*SERVICES, id="register", registry=registry)
    @kopf.on.create(*SERVICES, id="register", registry=registry)
    @kopf.on.update(*SERVICES, id="register", registry=registry)
    async def register_service(
        body: kopf.Body, patch: kopf.Patch, retry: int, reason: str, **_: Any
    ) -> None:
        outcome = await run(f"cityservice-{reason}", body, patch, services.reconcile)
        if outcome.permanent:
            raise kopf.PermanentError(outcome.permanent)
        if outcome.transient:
            kopf.warn(body, reason="Retrying", message="; ".join(outcome.transient))
            raise kopf.TemporaryError("; ".join(outcome.transient), delay=backoff(retry, timing))

    @kopf.timer(
        *SERVICES,
        id="drift",
        interval=timing.drift_interval,
        initial_delay=timing.drift_interval,
        registry=registry,
    )
    async def service_drift(body: kopf.Body, patch: kopf.Patch, **kwargs: Any) -> None:
        """Put back a registry entry deleted or edited behind the operator's back."""
        retry = int(kwargs.get("retry") or 0)
        outcome = await run("cityservice-timer", body, patch, services.reconcile)
        if outcome.transient and not outcome.permanent:
            raise kopf.TemporaryError("; ".join(outcome.transient), delay=backoff(retry, timing))

    @kopf.on.delete(*SERVICES, id="cleanup", registry=registry)
    async def deregister_service(body: kopf.Body, retry: int, **_: Any) -> None:
        started = time.monotonic()
        try:
            async with lock_for(body):
                done = await services.finalize(body)
        except (RegistryUnavailable, RegistryError) as exc:
            metrics.observe("cityservice-delete", "retry", time.monotonic() - started, ["registry"])
            raise kopf.TemporaryError(
                f"cannot clean up yet (registry): {exc}", delay=backoff(retry, timing)
            ) from None
        metrics.observe("cityservice-delete", "ok", time.monotonic() - started, [])
        meta = body["metadata"]
        for line in done:
            logging.getLogger(__name__).info("%s/%s: %s", meta["namespace"], meta["name"], line)

    return registry
