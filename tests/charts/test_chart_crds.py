"""The chart installs (and upgrades) the operator's CRDs unchanged, and every example resource in
examples/k8s/ validates against the CRD schema of its kind."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.charts import chart_crds_sync
from tests.charts.chart_support import ROOT, of_kind, render

EXAMPLES = sorted((ROOT / "examples" / "k8s").glob("*.yaml"))


def _operator_crds() -> dict[str, dict[str, Any]]:
    crds = {}
    for path in sorted(chart_crds_sync.SOURCE.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text(encoding="utf-8"))
        crds[crd["metadata"]["name"]] = crd
    return crds


def _rendered_crds(values: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    return {c["metadata"]["name"]: c for c in of_kind(render(values), "CustomResourceDefinition")}


def test_the_chart_copies_of_the_crds_match_operators_crds() -> None:
    assert chart_crds_sync.drift() == [], "run: .venv/bin/python -m tests.charts.chart_crds_sync"


def test_the_sync_script_repairs_a_drifted_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, copies = tmp_path / "operators", tmp_path / "chart"
    source.mkdir()
    copies.mkdir()
    (source / "cityapp.yaml").write_text("kind: CustomResourceDefinition # new\n")
    (source / "cityservice.yaml").write_text("v: 2\n")
    (copies / "cityservice.yaml").write_text("v: 1\n")
    (copies / "retired.yaml").write_text("v: 0\n")
    monkeypatch.setattr(chart_crds_sync, "SOURCE", source)
    monkeypatch.setattr(chart_crds_sync, "CHART_COPIES", copies)
    assert chart_crds_sync.drift() == [
        "cityapp.yaml: missing from the chart",
        "retired.yaml: no longer in operators/crds",
        "cityservice.yaml: differs from operators/crds/cityservice.yaml",
    ]
    chart_crds_sync.sync()
    assert chart_crds_sync.drift() == []
    assert sorted(p.name for p in copies.iterdir()) == ["cityapp.yaml", "cityservice.yaml"]


def test_the_rendered_crds_are_the_operators_crds_plus_labels_and_keep() -> None:
    expected = _operator_crds()
    rendered = _rendered_crds()
    assert rendered.keys() == expected.keys()
    for name, crd in rendered.items():
        metadata = crd["metadata"]
        # Deleting a CRD deletes every CityApp/CityService: uninstall must leave them.
        assert metadata["annotations"]["helm.sh/resource-policy"] == "keep"
        assert metadata["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert "namespace" not in metadata
        # Only metadata is added: the schema reaches the cluster exactly as generated (numbers
        # and patterns included, which a YAML round trip through Go templates could alter).
        assert {k: v for k, v in crd.items() if k != "metadata"} == {
            k: v for k, v in expected[name].items() if k != "metadata"
        }


def test_crds_can_be_left_to_the_cluster_admin_or_dropped_on_uninstall() -> None:
    assert _rendered_crds({"crds": {"install": False}}) == {}
    for crd in _rendered_crds({"crds": {"keep": False}}).values():
        assert "helm.sh/resource-policy" not in crd["metadata"].get("annotations", {})


def _as_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI 3.0 `nullable` as a JSON Schema type list, so `jsonschema` reads it as the API
    server does."""
    node = copy.deepcopy(node)
    stack = [node]
    while stack:
        each = stack.pop()
        if each.pop("nullable", False) and "type" in each:
            each["type"] = [each["type"], "null"]
        each.pop("x-kubernetes-preserve-unknown-fields", None)
        stack.extend(each.get("properties", {}).values())
        for key in ("items", "additionalProperties"):
            if isinstance(each.get(key), dict):
                stack.append(each[key])
    return node


def _schema_for(kind_api: tuple[str, str]) -> dict[str, Any]:
    api_version, kind = kind_api
    group, version = api_version.split("/")
    for crd in _rendered_crds().values():
        spec = crd["spec"]
        if spec["group"] == group and spec["names"]["kind"] == kind:
            for served in spec["versions"]:
                if served["name"] == version and served["served"]:
                    return _as_json_schema(served["schema"]["openAPIV3Schema"])
    raise LookupError(f"the chart installs no CRD serving {api_version} {kind}")


def test_there_are_examples_to_check() -> None:
    assert any(p.name.startswith("cityservice-") for p in EXAMPLES)


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_resource_validates_against_its_crd(example: Path) -> None:
    for document in yaml.safe_load_all(example.read_text(encoding="utf-8")):
        if not document:
            continue
        schema = _schema_for((document["apiVersion"], document["kind"]))
        jsonschema.validate(document, schema)


def test_the_crd_schema_rejects_a_resource_the_operator_could_not_serve() -> None:
    (example,) = [p for p in EXAMPLES if p.name.startswith("cityservice-")][:1]
    document = yaml.safe_load(example.read_text(encoding="utf-8"))
    document["spec"]["lifecycle"] = "sunsetting"
    with pytest.raises(jsonschema.ValidationError, match="sunsetting"):
        jsonschema.validate(document, _schema_for((document["apiVersion"], document["kind"])))
