"""The CityService CRD: generated from cityplane.schema, structural, and agreeing with it."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError

from cityplane.schema import AppSpec, CityApp, CityService, ServiceSpec
from operators import crd_schema as crds

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "k8s" / "cityservice-bus-times.yaml"

# JSONSchemaProps keywords a structural schema may not use (besides $ref/definitions).
_FORBIDDEN = {"$ref", "$defs", "definitions", "anyOf", "oneOf", "allOf", "not", "const", "title"}


def _committed() -> dict[str, Any]:
    return yaml.safe_load(crds.CITYSERVICE_FILE.read_text(encoding="utf-8"))


def _schema() -> dict[str, Any]:
    crd = crds.cityservice_crd()
    (version,) = crd["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path or "/", node
    for name, child in node.get("properties", {}).items():
        yield from _nodes(child, f"{path}/{name}")
    if isinstance(node.get("items"), dict):
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")


def structural_problems(schema: dict[str, Any]) -> list[str]:
    """What makes a schema non-structural (the subset of the rules our generator can break)."""
    problems = []
    for path, node in _nodes(schema):
        if forbidden := sorted(_FORBIDDEN & node.keys()):
            problems.append(f"{path}: forbidden {forbidden}")
        if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            problems.append(f"{path}: no type")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: additionalProperties next to properties")
        if node.get("type") == "object" and "items" in node:
            problems.append(f"{path}: items on an object")
        if "default" in node:
            # Kubernetes rejects a CRD whose defaults do not validate against their own node.
            try:
                jsonschema.validate(node["default"], as_json_schema(node))
            except jsonschema.ValidationError as exc:
                problems.append(f"{path}: invalid default: {exc.message}")
    return problems


def as_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI 3.0's `nullable` as JSON Schema's type list, so `jsonschema` reads it as the
    API server does. Unknown fields pass, as the API server prunes instead of rejecting."""
    node = copy.deepcopy(node)
    for _, each in _nodes(node):
        if each.pop("nullable", False):
            each["type"] = [each["type"], "null"]
        each.pop("x-kubernetes-preserve-unknown-fields", None)
    return node


def _example() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    return document


def _spec_validator() -> jsonschema.protocols.Validator:
    spec = as_json_schema(_schema()["properties"]["spec"])
    cls = jsonschema.validators.validator_for(spec)
    return cls(spec, format_checker=cls.FORMAT_CHECKER)


# --- drift and shape ------------------------------------------------------------------------


def test_committed_crd_matches_the_generator() -> None:
    for path, text in crds.generated_files().items():
        assert path.exists(), f"{path} is missing: run `python -m operators.crd_schema`"
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(ROOT)} drifted from cityplane/schema.py: "
            "run `python -m operators.crd_schema` and commit the result"
        )


def test_crd_names_columns_and_status_subresource() -> None:
    crd = _committed()
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == "cityservices.cityplane.io"
    spec = crd["spec"]
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "CityService"
    assert spec["names"]["shortNames"] == ["csvc"]
    assert spec["names"]["categories"] == ["cityplane"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Lifecycle": ".spec.lifecycle",
        "Version": ".spec.version",
        "Ready": '.status.conditions[?(@.type=="Ready")].status',
        "Age": ".metadata.creationTimestamp",
    }


def test_crd_schema_is_structural() -> None:
    schema = _schema()
    assert structural_problems(schema) == []
    # every field of ServiceSpec is in the CRD (generated, so none can be forgotten)
    assert set(schema["properties"]["spec"]["properties"]) == set(ServiceSpec.model_fields)
    assert schema["properties"]["status"]["x-kubernetes-preserve-unknown-fields"] is True


def test_structural_checker_catches_what_pydantic_emits() -> None:
    bad = {
        "type": "object",
        "additionalProperties": False,
        "properties": {"a": {"$ref": "#/$defs/A"}, "b": {"anyOf": [{"type": "string"}]}},
    }
    problems = structural_problems(bad)
    assert any("additionalProperties" in p for p in problems)
    assert any(p.startswith("/a:") and "$ref" in p for p in problems)
    assert any(p.startswith("/b:") and "anyOf" in p for p in problems)


def test_conversion_of_each_construct() -> None:
    defs = {"Inner": {"type": "object", "title": "Inner", "properties": {"x": {"type": "integer"}}}}
    source = {
        "type": "object",
        "title": "Outer",
        "additionalProperties": False,
        "properties": {
            "ref": {"$ref": "#/$defs/Inner", "description": "kept"},
            "opt": {"anyOf": [{"$ref": "#/$defs/Inner"}, {"type": "null"}], "default": None},
            "kind": {"const": "CityService", "type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "n": {"type": "integer", "minimum": 1, "maximum": 4, "default": 1, "examples": [2]},
        },
    }
    out = crds.structural(source, defs)
    assert "additionalProperties" not in out and "title" not in out
    assert out["properties"]["ref"] == {
        "type": "object",
        "properties": {"x": {"type": "integer"}},
        "description": "kept",
    }
    assert out["properties"]["opt"]["nullable"] is True
    assert "default" not in out["properties"]["opt"]
    assert out["properties"]["kind"] == {"enum": ["CityService"], "type": "string"}
    assert out["properties"]["labels"]["additionalProperties"] == {"type": "string"}
    assert out["properties"]["n"] == {"type": "integer", "minimum": 1, "maximum": 4, "default": 1}
    with pytest.raises(crds.SchemaConversionError, match="X \\| None"):
        crds.structural({"anyOf": [{"type": "string"}, {"type": "integer"}]}, {})
    with pytest.raises(crds.SchemaConversionError, match="patternProperties"):
        crds.structural({"type": "object", "patternProperties": {}}, {})


def test_crd_validates_against_kubernetes_1_30() -> None:
    kubernetes_validate.validate(_committed(), "1.30.0", strict=True)


# --- the example CR against both schemas ----------------------------------------------------


def test_example_cr_is_accepted_by_the_crd_and_by_the_model() -> None:
    document = _example()
    assert document["apiVersion"] == "cityplane.io/v1alpha1"
    assert document["kind"] == "CityService"
    _spec_validator().validate(document["spec"])
    CityService.model_validate(document)
    ServiceSpec.model_validate(document["spec"])


def _with(spec: dict[str, Any], path: list[str | int], value: Any) -> dict[str, Any]:
    spec = copy.deepcopy(spec)
    node: Any = spec
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return spec


@pytest.mark.parametrize(
    "path, value",
    [
        (["lifecycle"], "archived"),
        (["routes", 0, "rateLimit", "window"], "1 minute"),
        (["upstream", "timeouts", "connect"], "5x"),
        (["routes", 0, "name"], "Not_A_Name"),
        (["routes"], []),
        (["upstream", "loadBalancing"], "random"),
        (["upstream", "targets", 0, "weight"], 1001),
    ],
)
def test_bad_specs_are_rejected_by_both(path: list[str | int], value: Any) -> None:
    spec = _with(_example()["spec"], path, value)
    with pytest.raises(jsonschema.ValidationError):
        _spec_validator().validate(spec)
    with pytest.raises(ValidationError):
        ServiceSpec.model_validate(spec)


def test_null_optional_fields_are_accepted_by_both() -> None:
    spec = _with(_example()["spec"], ["upstream", "healthCheck"], None)
    spec = _with(spec, ["owner"], None)
    _spec_validator().validate(spec)
    ServiceSpec.model_validate(spec)


# --- the CityApp CRD ------------------------------------------------------------------------

APP_EXAMPLE = ROOT / "examples" / "k8s" / "cityapp-bus-tracker.yaml"


def _app_schema() -> dict[str, Any]:
    (version,) = crds.cityapp_crd()["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def _app_validator() -> jsonschema.protocols.Validator:
    spec = as_json_schema(_app_schema()["properties"]["spec"])
    for _, node in _nodes(spec):
        node.pop("x-kubernetes-validations", None)
    cls = jsonschema.validators.validator_for(spec)
    return cls(spec, format_checker=cls.FORMAT_CHECKER)


def test_cityapp_crd_names_columns_and_status_subresource() -> None:
    crd = yaml.safe_load(crds.CITYAPP_FILE.read_text(encoding="utf-8"))
    assert crd["metadata"]["name"] == "cityapps.cityplane.io"
    assert crd["spec"]["names"]["kind"] == "CityApp"
    assert crd["spec"]["names"]["shortNames"] == ["capp"]
    (version,) = crd["spec"]["versions"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Reason"] == '.status.conditions[?(@.type=="Ready")].reason'
    assert columns["URL"] == ".status.url"
    kubernetes_validate.validate(crd, "1.30.0", strict=True)


def test_cityapp_crd_schema_is_structural_and_complete() -> None:
    schema = _app_schema()
    assert structural_problems(schema) == []
    spec = schema["properties"]["spec"]
    assert set(spec["properties"]) == set(AppSpec.model_fields)
    # the routes are the CityService's own route schema
    service_route = _schema()["properties"]["spec"]["properties"]["routes"]["items"]
    app_route = spec["properties"]["routes"]["items"]
    assert set(app_route["properties"]) == set(service_route["properties"])
    # no `nullable`: a null is pruned by the API server, so CEL's has() means "set"
    assert [path for path, node in _nodes(spec) if "nullable" in node] == []


def test_cityapp_crd_carries_the_cross_field_rules() -> None:
    spec = _app_schema()["properties"]["spec"]
    rules = {r["message"]: r["rule"] for r in spec["x-kubernetes-validations"]}
    assert "give either replicas or autoscaling, not both" in rules
    autoscaling = spec["properties"]["autoscaling"]["x-kubernetes-validations"]
    assert "minReplicas" in autoscaling[0]["rule"]
    match = spec["properties"]["routes"]["items"]["properties"]["match"]
    assert match["x-kubernetes-validations"][0]["rule"] == "has(self.pathPrefix) != has(self.path)"
    identity = spec["properties"]["identity"]["x-kubernetes-validations"]
    assert "client_credentials" in identity[0]["rule"]


def test_cityapp_example_is_accepted_by_the_crd_and_by_the_model() -> None:
    document = yaml.safe_load(APP_EXAMPLE.read_text(encoding="utf-8"))
    assert document["kind"] == "CityApp"
    _app_validator().validate(document["spec"])
    CityApp.model_validate({**document, "metadata": {"name": document["metadata"]["name"]}})


@pytest.mark.parametrize(
    "path, value",
    [
        (["port"], 70000),
        (["image"], "Not An Image"),
        (["autoscaling", "targetCPUUtilizationPercentage"], 0),
        (["identity", "grantTypes"], ["implicit"]),
        (["routes", 0, "rateLimit", "window"], "soon"),
        (["env", 0, "name"], "1BAD"),
        (["resources", "requests", "memory"], "lots"),
        (["healthCheck", "period"], "often"),
    ],
)
def test_bad_cityapp_specs_are_rejected_by_both(path: list[str | int], value: Any) -> None:
    spec = _with(yaml.safe_load(APP_EXAMPLE.read_text(encoding="utf-8"))["spec"], path, value)
    with pytest.raises(jsonschema.ValidationError):
        _app_validator().validate(spec)
    with pytest.raises(ValidationError):
        AppSpec.model_validate(spec)
