"""Names and labels the operator gives what it creates for a CityApp.

Selectors use one label only (``cityplane.io/app``) so they never change: a Deployment's
``spec.selector`` is immutable, and a selector that grew a label would break every upgrade.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from cityplane.schema import API_VERSION

APP_LABEL = "cityplane.io/app"
MANAGED_BY = "cityplane-operator"
ROTATE_ANNOTATION = "cityplane.io/rotate-secret"
OWNER_ANNOTATION = "cityplane.io/owner"
REGISTRY_NAME_ANNOTATION = "cityplane.io/registry-name"
# Labels the operator puts on its registry entry, to tell its entries from others' (it never
# overwrites or deletes a service some other CityApp or person registered under that name).
REGISTRY_NAMESPACE_LABEL = "cityplane.io/namespace"
REGISTRY_APP_LABEL = "cityplane.io/cityapp"

# A Service name is an RFC 1035 label (63 characters, a letter first); the children carry the
# app's name, so the app's name must be one too.
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_CLIENT_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{1,62}$")
_REGISTRY_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class InvalidName(ValueError):
    """The CityApp's name (or an annotation) cannot be used for what the operator creates."""


@dataclass(frozen=True, slots=True)
class AppRef:
    """What the render functions need to know about the CityApp object itself."""

    name: str
    namespace: str
    uid: str
    generation: int = 1
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_body(cls, body: Any) -> AppRef:
        meta = body["metadata"]
        return cls(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta.get("uid") or "",
            generation=int(meta.get("generation") or 1),
            annotations=dict(meta.get("annotations") or {}),
        )

    def check(self) -> None:
        if not _DNS_1035.match(self.name):
            raise InvalidName(
                f"the name {self.name!r} must be an RFC 1035 label (at most 63 lowercase "
                "letters, digits or '-', starting with a letter): it names the app's Service"
            )
        registry_name(self)  # raises on a bad annotation

    @property
    def secret_name(self) -> str:
        return f"{self.name}-oidc"


def selector(app: AppRef) -> dict[str, str]:
    return {APP_LABEL: app.name}


def labels(app: AppRef) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": app.name,
        "app.kubernetes.io/instance": app.name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/part-of": "cityplane",
        **selector(app),
    }


def owner_reference(app: AppRef) -> dict[str, Any]:
    # controller + blockOwnerDeletion: the garbage collector deletes the children with the app,
    # and `kubectl get ... -o wide` shows which CityApp controls them.
    return {
        "apiVersion": API_VERSION,
        "kind": "CityApp",
        "name": app.name,
        "uid": app.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _fit(text: str, limit: int) -> str:
    """``text`` when it fits, else a prefix and a hash of the whole (stable, still unique)."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return f"{text[: limit - 11].rstrip('.-')}-{digest}"


def registry_name(app: AppRef) -> str:
    """The app's service name in the registry: ``<namespace>-<name>`` (registry names are one
    namespace for the whole city), or the ``cityplane.io/registry-name`` annotation."""
    wanted = app.annotations.get(REGISTRY_NAME_ANNOTATION)
    if wanted is not None:
        if not _REGISTRY_NAME.match(wanted):
            raise InvalidName(
                f"annotation {REGISTRY_NAME_ANNOTATION}={wanted!r} is not a registry service name"
            )
        return wanted
    return _fit(f"{app.namespace}-{app.name}", 63)


def client_id(app: AppRef) -> str:
    """The OIDC ``client_id``: ``<namespace>.<name>`` (docs/identity-api.md allows 63 chars)."""
    value = _fit(f"{app.namespace}.{app.name}", 63)
    if not _CLIENT_ID.match(value):  # pragma: no cover - namespaces and names are DNS labels
        raise InvalidName(f"cannot make an OIDC client_id from {value!r}")
    return value


def owner(app: AppRef) -> str:
    """Who owns the registry entry (``spec.owner``): the annotation, else the namespace."""
    return app.annotations.get(OWNER_ANNOTATION) or app.namespace
