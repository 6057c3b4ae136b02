"""Rendering `charts/cityplane` with the real Helm engine (helm-python-sdk's libhelm_c, Helm v4's
Go SDK through ctypes: no `helm` binary, no network) and looking at what comes out."""

from __future__ import annotations

import functools
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "cityplane"
PRODUCTION_VALUES = CHART / "ci" / "production-values.yaml"
RELEASE = "city"
NAMESPACE = "cityplane"

# Kinds whose schemas live in CRDs the Kubernetes schema set does not carry.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


@functools.cache
def _chart(path: Path) -> helm.Chart:
    return helm.Chart.load(path)


def production_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(PRODUCTION_VALUES.read_text(encoding="utf-8"))
    return values


def render_files(
    values: dict[str, Any] | None = None,
    *,
    chart: Path = CHART,
    name: str = RELEASE,
    namespace: str = NAMESPACE,
) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` would produce (NOTES.txt included)."""
    return _chart(chart).render(values or {}, name=name, namespace=namespace)


def render(
    values: dict[str, Any] | None = None,
    *,
    chart: Path = CHART,
    name: str = RELEASE,
    namespace: str = NAMESPACE,
) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders."""
    objects = []
    for path, text in sorted(
        render_files(values, chart=chart, name=name, namespace=namespace).items()
    ):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def notes(values: dict[str, Any] | None = None) -> str:
    return render_files(values)[f"{CHART.name}/templates/NOTES.txt"]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise LookupError(f"no {kind} {name} among {sorted(ident(o) for o in objects)}")


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def ident(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(object, pod spec) for every Pod and pod template the chart renders."""
    for obj in objects:
        if obj["kind"] == "Pod":
            yield ident(obj), obj["spec"]
        elif obj["kind"] in POD_TEMPLATE_KINDS:
            yield ident(obj), obj["spec"]["template"]["spec"]


def container(objects: list[dict[str, Any]], deployment: str) -> dict[str, Any]:
    (only,) = find(objects, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = only
    return result


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def copy_chart(destination: Path, **chart_yaml: str) -> Path:
    """A copy of the chart with fields of Chart.yaml replaced (e.g. version=…)."""
    target = destination / CHART.name
    shutil.copytree(CHART, target)
    metadata = yaml.safe_load((target / "Chart.yaml").read_text(encoding="utf-8"))
    metadata.update(chart_yaml)
    (target / "Chart.yaml").write_text(yaml.safe_dump(metadata, sort_keys=False), encoding="utf-8")
    return target
