"""API lifecycle: draft → published → deprecated → retired, and the rules around `sunset`.

Pure functions over documents; the store calls them inside the write transaction, so a check
and the write it allows see the same state.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, get_args

from pydantic import AwareDatetime, ValidationError

from cityplane.schema import CityService, Lifecycle, Strict
from registry.bodies import stored_form
from registry.errors import invalid_document, invalid_transition

LIFECYCLES: tuple[str, ...] = get_args(Lifecycle)

ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("draft", "published"),
        ("published", "deprecated"),
        ("deprecated", "published"),  # un-deprecate
        ("deprecated", "retired"),
        ("published", "retired"),
    }
)

# A sunset only makes sense once an API is on its way out (RFC 8594).
_SUNSET_ALLOWED = frozenset({"deprecated", "retired"})


class TransitionRequest(Strict):
    """Body of `POST /v1/services/{name}/lifecycle`."""

    to: Lifecycle
    sunset: AwareDatetime | None = None


def _utc(value: datetime) -> datetime:
    # The document schema accepts a sunset without a zone; read it as UTC rather than fail.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def check_transition(current: str, to: str) -> None:
    if (current, to) not in ALLOWED:
        allowed = sorted(b for a, b in ALLOWED if a == current)
        hint = f"; from {current} a service can go to {', '.join(allowed)}" if allowed else ""
        raise invalid_transition(f"{current} → {to} is not an allowed transition{hint}")


def transition(
    document: dict[str, Any], request: TransitionRequest, now: datetime
) -> dict[str, Any]:
    """The document after moving it to `request.to` (raises `invalid-transition`)."""
    spec = dict(document["spec"])
    current = spec.get("lifecycle", "published")
    check_transition(current, request.to)
    if request.sunset is not None:
        if request.to != "deprecated":
            raise invalid_transition("'sunset' is accepted only with to: deprecated")
        if request.sunset <= now:
            raise invalid_transition("'sunset' must be in the future")
    spec["lifecycle"] = request.to
    if request.to == "deprecated":
        spec["deprecatedSince"] = now.isoformat()
        spec.pop("sunset", None)
        if request.sunset is not None:
            spec["sunset"] = request.sunset.isoformat()
    elif request.to == "published":
        spec.pop("deprecatedSince", None)
        spec.pop("sunset", None)
    try:
        service = CityService.model_validate({**document, "spec": spec})
    except ValidationError as exc:  # only if the stored document no longer fits the schema
        raise invalid_transition(f"the service's document is not valid: {exc}") from None
    return stored_form(service)


def check_update(old: CityService | None, new: CityService, now: datetime) -> None:
    """Rules a created or replaced document must follow beyond the schema."""
    spec = new.spec
    if spec.sunset is not None and spec.lifecycle not in _SUNSET_ALLOWED:
        raise invalid_document(
            [{"field": "spec.sunset", "message": f"a {spec.lifecycle} service has no sunset"}]
        )
    if old is None:
        return  # any starting state: importing an API that is already deprecated is fine
    if old.spec.lifecycle != spec.lifecycle:
        check_transition(old.spec.lifecycle, spec.lifecycle)
    deprecating = spec.lifecycle == "deprecated" and (
        old.spec.lifecycle != "deprecated" or old.spec.sunset != spec.sunset
    )
    if deprecating and spec.sunset is not None and _utc(spec.sunset) <= now:
        raise invalid_transition("'spec.sunset' must be in the future")
