"""The CityPlane CustomResourceDefinitions, generated from the one service schema.

``python -m operators.crd_schema`` writes ``operators/crds/cityservice.yaml`` and
``operators/crds/cityapp.yaml``; a test fails when the committed files and the generator drift
apart. No field list is written here: each CRD's ``openAPIV3Schema`` is pydantic's JSON Schema of
:mod:`cityplane.schema` converted into a Kubernetes *structural* schema by :func:`structural`;
only the cross-field rules Kubernetes can check (CEL ``x-kubernetes-validations``) are added.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from cityplane.schema import API_VERSION, app_json_schema, service_json_schema

GROUP, VERSION = API_VERSION.split("/")
CRDS_DIR = Path(__file__).resolve().parent / "crds"
CITYSERVICE_FILE = CRDS_DIR / "cityservice.yaml"
CITYAPP_FILE = CRDS_DIR / "cityapp.yaml"

# Keywords a structural schema keeps as they are (all are JSONSchemaProps fields).
_KEPT = {
    "type",
    "description",
    "format",
    "pattern",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "required",
    "nullable",
}
# Keywords dropped: annotations Kubernetes does not need (or rejects: `$schema`, `examples`).
_DROPPED = {"title", "examples", "$schema", "$comment"}


class SchemaConversionError(ValueError):
    """pydantic produced a JSON-Schema construct that has no structural equivalent here."""


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a ``$ref`` into ``#/$defs``; sibling keywords (description, default) win."""
    if "$ref" not in node:
        return node
    ref = node["$ref"]
    prefix = "#/$defs/"
    if not ref.startswith(prefix) or ref[len(prefix) :] not in defs:
        raise SchemaConversionError(f"unsupported $ref {ref!r}")
    merged = dict(defs[ref[len(prefix) :]])
    merged.update({k: v for k, v in node.items() if k != "$ref"})
    return merged


def _is_null(node: dict[str, Any]) -> bool:
    return node == {"type": "null"}


def structural(node: dict[str, Any], defs: dict[str, Any], path: str = "") -> dict[str, Any]:
    """Convert one pydantic JSON-Schema node (and its children) to a structural schema node."""
    node = _resolve(node, defs)
    out: dict[str, Any] = {}
    if "anyOf" in node:
        # `X | None`: anyOf [X, {type: null}] becomes X with `nullable: true`; the keywords next
        # to anyOf (description, default) apply to X.
        variants = node["anyOf"]
        others = [v for v in variants if not _is_null(v)]
        if len(others) != 1 or len(variants) != 2:
            raise SchemaConversionError(f"{path or '/'}: only `X | None` unions are supported")
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        return {**structural({**_resolve(others[0], defs), **rest}, defs, path), "nullable": True}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key in _KEPT:
            out[key] = copy.deepcopy(value)
        elif key == "const":
            out["enum"] = [value]
        elif key == "default":
            # A null default means "absent"; Kubernetes would reject or store it, so omit it.
            # Other defaults are applied by the API server, the same values pydantic applies.
            # pydantic writes a Duration's default as seconds (5.0) on a string node; Kubernetes
            # rejects a CRD whose default does not match its type, so such a default is left to
            # pydantic (the operator reads specs through ServiceSpec, which fills it in).
            if value is not None and _fits(value, node.get("type")):
                out["default"] = copy.deepcopy(value)
        elif key == "properties":
            out["properties"] = {
                name: structural(child, defs, f"{path}/{name}") for name, child in value.items()
            }
        elif key == "items":
            out["items"] = structural(value, defs, f"{path}[]")
        elif key == "additionalProperties":
            if value is False:
                # Structural schemas forbid `additionalProperties: false` next to `properties`.
                # Nothing is lost: the API server prunes unknown fields of a CR by default
                # (no x-kubernetes-preserve-unknown-fields), and ServiceSpec forbids them.
                continue
            if value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
            else:  # a map, e.g. dict[str, str] -> additionalProperties: {type: string}
                out["additionalProperties"] = structural(value, defs, f"{path}{{}}")
        else:
            raise SchemaConversionError(f"{path or '/'}: unsupported keyword {key!r}")
    return _finish(out, path)


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


def _fits(value: Any, type_: str | None) -> bool:
    """Whether a default has the node's JSON type (bool is no number here, as in JSON)."""
    if type_ is None:
        return True
    if isinstance(value, bool) and type_ != "boolean":
        return False
    return isinstance(value, _JSON_TYPES.get(type_, ()))


def _finish(out: dict[str, Any], path: str) -> dict[str, Any]:
    if "type" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        raise SchemaConversionError(f"{path or '/'}: node without a type")
    return out


def _resource_schema(description: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            # The CR's metadata is Kubernetes' ObjectMeta, validated by the API server itself.
            "metadata": {"type": "object"},
            "spec": spec,
            # Written by the operator only (operators/status.py): observedGeneration,
            # conditions, …; kept open so a newer operator can add fields without a CRD upgrade.
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    }


def cityservice_openapi_schema() -> dict[str, Any]:
    """``openAPIV3Schema`` of a CityService: its ``spec`` from ServiceSpec, a free ``status``."""
    schema = service_json_schema()
    defs = schema.get("$defs", {})
    spec = structural(schema["properties"]["spec"], defs, "/spec")
    return _resource_schema(
        "A city service (external or legacy API) routed by the CityPlane gateway.", spec
    )


def cityservice_crd() -> dict[str, Any]:
    """The CustomResourceDefinition ``cityservices.cityplane.io``."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"cityservices.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "plural": "cityservices",
                "singular": "cityservice",
                "kind": "CityService",
                "listKind": "CityServiceList",
                "shortNames": ["csvc"],
                "categories": ["cityplane"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Lifecycle", "type": "string", "jsonPath": ".spec.lifecycle"},
                        {"name": "Version", "type": "string", "jsonPath": ".spec.version"},
                        {
                            "name": "Ready",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": cityservice_openapi_schema()},
                }
            ],
        },
    }


# --- CityApp ---------------------------------------------------------------------------------

# Cross-field rules of AppSpec that the API server can check itself, so `kubectl apply` refuses a
# bad CityApp at once instead of the operator reporting it later (the operator still validates
# everything through AppSpec). Keyed by the node's path in the spec schema. Unique route names are
# left to the operator: a pairwise CEL rule over unbounded strings exceeds the API server's
# estimated cost budget and would make the whole CRD unacceptable.
# The rules rely on `has()`: the CityApp schema has no `nullable`, so a null is pruned (absent),
# see _without_nullable.
CITYAPP_RULES: dict[str, list[dict[str, str]]] = {
    "": [
        {
            "rule": "!(has(self.replicas) && has(self.autoscaling))",
            "message": "give either replicas or autoscaling, not both",
            "fieldPath": ".autoscaling",
        },
    ],
    "/autoscaling": [
        {
            "rule": "!has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
            "message": "minReplicas must not be greater than maxReplicas",
        }
    ],
    "/routes[]/match": [
        {
            "rule": "has(self.pathPrefix) != has(self.path)",
            "message": "give exactly one of 'pathPrefix' or 'path'",
        }
    ],
    "/identity": [
        {
            "rule": "!(has(self.publicClient) && self.publicClient && has(self.grantTypes)"
            " && 'client_credentials' in self.grantTypes)",
            "message": "a public client cannot use the client_credentials grant",
        }
    ],
}


def _without_nullable(node: dict[str, Any]) -> dict[str, Any]:
    """Drop `nullable` everywhere: a null in a CityApp means "not set", and without `nullable`
    the API server prunes nulls before validation, so CEL's `has()` tells set from unset."""
    out = {k: v for k, v in node.items() if k != "nullable"}
    if "properties" in out:
        out["properties"] = {k: _without_nullable(v) for k, v in out["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = _without_nullable(out[key])
    return out


def _node_at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    node = schema
    for part in filter(None, path.split("/")):
        if part.endswith("[]"):
            node = node["properties"][part[:-2]]["items"]
        else:
            node = node["properties"][part]
    return node


def cityapp_openapi_schema() -> dict[str, Any]:
    """``openAPIV3Schema`` of a CityApp: ``spec`` from AppSpec plus CEL rules, a free status."""
    schema = app_json_schema()
    spec = _without_nullable(structural(schema["properties"]["spec"], schema["$defs"], "/spec"))
    for path, rules in CITYAPP_RULES.items():
        _node_at(spec, path)["x-kubernetes-validations"] = copy.deepcopy(rules)
    return _resource_schema(
        "An app plugged into the city: workload, gateway routes and OIDC client.", spec
    )


def cityapp_crd() -> dict[str, Any]:
    """The CustomResourceDefinition ``cityapps.cityplane.io``."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"cityapps.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "plural": "cityapps",
                "singular": "cityapp",
                "kind": "CityApp",
                "listKind": "CityAppList",
                "shortNames": ["capp"],
                "categories": ["cityplane"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Image", "type": "string", "jsonPath": ".spec.image"},
                        {"name": "URL", "type": "string", "jsonPath": ".status.url"},
                        {
                            "name": "Ready",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                        },
                        {
                            "name": "Reason",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": cityapp_openapi_schema()},
                }
            ],
        },
    }


HEADER = "# Generated by `python -m operators.crd_schema` from cityplane/schema.py. Do not edit.\n"


def render(crd: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(crd, sort_keys=False, width=100)


def generated_files() -> dict[Path, str]:
    return {CITYSERVICE_FILE: render(cityservice_crd()), CITYAPP_FILE: render(cityapp_crd())}


def main() -> int:
    for path, text in generated_files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
