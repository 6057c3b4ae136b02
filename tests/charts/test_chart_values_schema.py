"""values.schema.json: Helm rejects values the chart would silently ignore or misuse, before
anything reaches the cluster, and still accepts a parent chart's `global`."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

from tests.charts.chart_support import CHART, production_values, render


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"replicas": 3}, "additional properties 'replicas' not allowed"),
        ({"gateway": {"replicas": 3}}, "additional properties 'replicas' not allowed"),
        ({"gateway": {"autoscaling": {"enable": True}}}, "'enable' not allowed"),
        ({"gateway": {"replicaCount": -1}}, "minimum"),
        ({"gateway": {"replicaCount": "3"}}, "/gateway/replicaCount"),
        ({"gateway": {"port": 70000}}, "maximum"),
        ({"gateway": {"service": {"type": "ExternalName"}}}, "/gateway/service/type"),
        ({"gateway": {"trustedProxies": ["everyone"]}}, "/gateway/trustedProxies/0"),
        ({"gateway": {"env": {"PATH": "/tmp"}}}, "'PATH' does not match pattern"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"image": {"digest": "latest"}}, "/image/digest"),
        ({"identity": {"issuer": "https://id.city.example/?tenant=1"}}, "/identity/issuer"),
        ({"postgresql": {"ssl": "on"}}, "/postgresql/ssl"),
        ({"logLevel": "chatty"}, "/logLevel"),
        ({"serviceMonitor": {"interval": "often"}}, "/serviceMonitor/interval"),
        ({"registry": {"persistence": {"size": "a lot"}}}, "/registry/persistence/size"),
    ],
)
def test_bad_values_are_rejected_with_the_offending_key(
    values: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(helm.HelmValuesError, match=complaint.replace("'", ".")):
        render(values)


def test_global_values_of_a_parent_chart_are_accepted() -> None:
    render({"global": {"imageRegistry": "mirror.city", "storageClass": "fast", "anything": 1}})


@pytest.mark.parametrize("values", [{}, production_values()], ids=["default", "production"])
def test_the_shipped_values_satisfy_the_schema(values: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values(values))
