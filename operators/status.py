"""The CityApp's status: conditions in the Kubernetes API conventions, rolled up into Ready.

https://github.com/kubernetes/community/blob/master/contributors/devel/sig-architecture/api-conventions.md#typical-status-properties
— each condition has a type, a status (True/False/Unknown), a CamelCase reason and a message
for humans; ``lastTransitionTime`` changes only when the status does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

ConditionStatus = Literal["True", "False", "Unknown"]
WORKLOAD, ROUTES, IDENTITY, REGISTERED = (
    "WorkloadReady",
    "RoutesProgrammed",
    "IdentityProvisioned",
    "Registered",
)
PARTS = (WORKLOAD, ROUTES, IDENTITY, REGISTERED)
READY = "Ready"


@dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: ConditionStatus
    reason: str
    message: str

    @property
    def ok(self) -> bool:
        return self.status == "True"


def ready(parts: Iterable[Condition]) -> Condition:
    """True when every part is; otherwise False (or Unknown) with the first failing reason and
    every failing part's message, so `kubectl get` shows why without a second look."""
    failing = [c for c in parts if not c.ok]
    if not failing:
        return Condition(READY, "True", "Ready", "the app is deployed, routed and provisioned")
    status: ConditionStatus = "False" if any(c.status == "False" for c in failing) else "Unknown"
    message = "; ".join(f"{c.type}: {c.message}" for c in failing)
    return Condition(READY, status, failing[0].reason, message)


def invalid(message: str, parts: Iterable[str] = PARTS) -> list[Condition]:
    """The conditions of a resource whose spec cannot be used at all (``parts``: its condition
    types besides Ready; a CityApp's by default)."""
    unknown = [Condition(t, "Unknown", "InvalidSpec", "the spec is invalid") for t in parts]
    return [*unknown, Condition(READY, "False", "InvalidSpec", message)]


def render_conditions(
    conditions: Iterable[Condition],
    previous: Iterable[Mapping[str, Any]] | None,
    generation: int,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    before = {c.get("type"): c for c in previous or () if isinstance(c, Mapping)}
    out = []
    for condition in conditions:
        old = before.get(condition.type)
        keep = old is not None and old.get("status") == condition.status
        out.append(
            {
                "type": condition.type,
                "status": condition.status,
                "reason": condition.reason,
                "message": condition.message,
                "observedGeneration": generation,
                "lastTransitionTime": old.get("lastTransitionTime", stamp)
                if keep and old is not None
                else stamp,
            }
        )
    return out


def condition_of(status: Mapping[str, Any] | None, type_: str) -> Mapping[str, Any] | None:
    for condition in (status or {}).get("conditions") or ():
        if isinstance(condition, Mapping) and condition.get("type") == type_:
            return condition
    return None
