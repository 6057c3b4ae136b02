"""The pure render functions: every field of a CityApp's spec lands where it should, and every
rendered object is valid Kubernetes 1.30 (kubernetes-validate, strict)."""

from __future__ import annotations

import base64
import copy
from typing import Any

import kubernetes_validate
import pytest
from pydantic import ValidationError

from cityplane.schema import AppSpec
from operators import render
from operators.naming import AppRef, InvalidName, client_id, registry_name
from operators.reconcile import describe, workload_condition
from tests.operators.test_operator_lifecycle import example

APP = AppRef(
    name="bus-tracker",
    namespace="transport",
    uid="0b4f-uid",
    annotations={"cityplane.io/owner": "org-transport"},
)
SETTINGS = render.RenderSettings()


def spec(**changes: Any) -> AppSpec:
    document = copy.deepcopy(example()["spec"])
    for key, value in changes.items():
        if value is None:
            document.pop(key, None)
        else:
            document[key] = value
    return AppSpec.model_validate(document)


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return result


def valid(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, "1.30.0", strict=True)


def every_object(app_spec: AppSpec) -> list[dict[str, Any]]:
    credentials = render.ClientCredentials("transport.bus-tracker", "s3cret", "https://id.example")
    return [
        *render.render_workload(APP, app_spec, SETTINGS, 3),
        render.render_secret(APP, credentials),
    ]


@pytest.mark.parametrize(
    "variant", ["autoscaled", "fixed replicas", "public client", "no identity"]
)
def test_every_rendered_object_is_valid_kubernetes_1_30_with_owner_and_labels(variant: str) -> None:
    app_spec = {
        "autoscaled": spec(),
        "fixed replicas": spec(autoscaling=None, replicas=3, resources=None),
        "public client": spec(
            identity={"redirectUris": ["http://localhost:8000/cb"], "publicClient": True}
        ),
        "no identity": spec(identity=None),
    }[variant]
    for obj in every_object(app_spec):
        valid(obj)
        meta = obj["metadata"]
        assert meta["namespace"] == "transport"
        assert meta["labels"]["cityplane.io/app"] == "bus-tracker"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "cityplane-operator"
        (owner,) = meta["ownerReferences"]
        assert owner == {
            "apiVersion": "cityplane.io/v1alpha1",
            "kind": "CityApp",
            "name": "bus-tracker",
            "uid": "0b4f-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }


def test_deployment_carries_image_port_env_resources_and_probes() -> None:
    deployment = render.render_deployment(APP, spec(), secret_revision=4)
    c = container(deployment)
    assert c["image"] == "registry.example.org/vendors/bus-tracker:1.4.2"
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert c["env"][0] == {"name": "LOG_LEVEL", "value": "info"}
    assert c["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"cpu": "1", "memory": "256Mi"},
    }
    assert c["livenessProbe"] == {
        "httpGet": {"path": "/healthz", "port": "http"},
        "initialDelaySeconds": 1,
        "periodSeconds": 10,
        "timeoutSeconds": 2,
        "failureThreshold": 3,
    }
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert deployment["spec"]["selector"] == {"matchLabels": {"cityplane.io/app": "bus-tracker"}}
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"] == {"cityplane.io/oidc-secret-revision": "4"}
    # the HPA owns replicas when autoscaling is on
    assert "replicas" not in deployment["spec"]


def test_probe_durations_become_whole_seconds_of_at_least_one() -> None:
    c = container(
        render.render_deployment(
            APP,
            spec(
                healthCheck={
                    "path": "/live",
                    "initialDelay": "1500ms",
                    "period": "250ms",
                    "timeout": "2.2s",
                    "failureThreshold": 7,
                }
            ),
        )
    )
    assert c["livenessProbe"]["httpGet"]["path"] == "/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/live"  # no readinessPath: the same
    assert (
        c["livenessProbe"]["initialDelaySeconds"],
        c["livenessProbe"]["periodSeconds"],
        c["livenessProbe"]["timeoutSeconds"],
        c["livenessProbe"]["failureThreshold"],
    ) == (2, 1, 3, 7)


def test_restricted_pod_security() -> None:
    deployment = render.render_deployment(APP, spec())
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["automountServiceAccountToken"] is False
    assert container(deployment)["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert {"name": "tmp", "mountPath": "/tmp"} in container(deployment)["volumeMounts"]


@pytest.mark.parametrize(("replicas", "expected"), [(None, 1), (0, 0), (5, 5)])
def test_replicas_default_to_one(replicas: int | None, expected: int) -> None:
    app_spec = spec(autoscaling=None, replicas=replicas)
    assert render.render_deployment(APP, app_spec)["spec"]["replicas"] == expected
    assert render.render_autoscaler(APP, app_spec) is None
    kinds = [o["kind"] for o in render.render_workload(APP, app_spec, SETTINGS)]
    assert kinds == ["Service", "Deployment", "PodDisruptionBudget", "NetworkPolicy"]


def test_autoscaling_renders_an_hpa_v2_on_cpu() -> None:
    hpa = render.render_autoscaler(APP, spec())
    assert hpa is not None
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "bus-tracker",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    assert hpa["spec"]["metrics"][0]["resource"] == {
        "name": "cpu",
        "target": {"type": "Utilization", "averageUtilization": 70},
    }


def test_service_and_disruption_budget_select_the_pods() -> None:
    service = render.render_service(APP, spec(port=9090))
    assert service["spec"]["selector"] == {"cityplane.io/app": "bus-tracker"}
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 9090, "targetPort": "http", "protocol": "TCP"}
    ]
    pdb = render.render_disruption_budget(APP, spec())
    assert pdb["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": {"cityplane.io/app": "bus-tracker"}},
    }


def test_network_policy_admits_only_the_gateway_on_the_app_port() -> None:
    default = render.render_network_policy(APP, spec(), SETTINGS)
    (rule,) = default["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]
    assert rule["from"] == [
        {
            "podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}},
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "transport"}},
        }
    ]
    assert default["spec"]["policyTypes"] == ["Ingress"]
    custom = render.render_network_policy(
        APP,
        spec(),
        render.RenderSettings(
            gateway_namespace="cityplane", gateway_selector={"app": "gw", "tier": "edge"}
        ),
    )
    peer = custom["spec"]["ingress"][0]["from"][0]
    assert peer["podSelector"]["matchLabels"] == {"app": "gw", "tier": "edge"}
    assert peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] == "cityplane"


def test_identity_env_comes_from_the_secret_and_public_clients_get_no_secret() -> None:
    env = container(render.render_deployment(APP, spec()))["env"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
    assert refs["CITYPLANE_OIDC_CLIENT_SECRET"] == {
        "name": "bus-tracker-oidc",
        "key": "client_secret",
    }
    assert set(refs) == {
        "CITYPLANE_OIDC_CLIENT_ID",
        "CITYPLANE_OIDC_CLIENT_SECRET",
        "CITYPLANE_OIDC_ISSUER",
        "CITYPLANE_OIDC_DISCOVERY_URL",
    }
    public = spec(identity={"redirectUris": ["https://t.example/cb"], "publicClient": True})
    names = [e["name"] for e in container(render.render_deployment(APP, public))["env"]]
    assert "CITYPLANE_OIDC_CLIENT_SECRET" not in names and "CITYPLANE_OIDC_CLIENT_ID" in names


def test_secret_holds_client_id_secret_issuer_and_discovery_url() -> None:
    secret = render.render_secret(
        APP, render.ClientCredentials("transport.bus-tracker", "s3cret", "https://id.example/")
    )
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data == {
        "client_id": "transport.bus-tracker",
        "client_secret": "s3cret",
        "issuer": "https://id.example/",
        "discovery_url": "https://id.example/.well-known/openid-configuration",
    }
    assert secret["metadata"]["name"] == "bus-tracker-oidc"
    public = render.render_secret(APP, render.ClientCredentials("x.y", None, "https://id.example"))
    assert "client_secret" not in public["data"]


def test_client_spec_follows_the_hub_contract() -> None:
    assert render.client_spec(APP, spec()) == {
        "name": "bus-tracker (transport)",
        "redirect_uris": ["https://tracker.city.example/callback"],
        "scopes": ["openid", "profile", "tracker:report"],
        "grant_types": ["authorization_code", "refresh_token"],
        "public": False,
        "min_trust_level": 2,
        "owner": "org-transport",
        "post_logout_redirect_uris": [],
        "backchannel_logout_uri": None,
    }


def test_city_service_routes_to_the_app_service_with_the_spec_routes() -> None:
    app_spec = spec(version="v2", lifecycle="deprecated")
    document = render.render_city_service(APP, app_spec, SETTINGS)
    assert document.metadata.name == "transport-bus-tracker"
    assert document.metadata.labels == {
        "cityplane.io/namespace": "transport",
        "cityplane.io/cityapp": "bus-tracker",
    }
    assert document.spec.version == "v2" and document.spec.lifecycle == "deprecated"
    assert document.spec.owner == "org-transport"
    assert [t.url for t in document.spec.upstream.targets] == [
        "http://bus-tracker.transport.svc.cluster.local:8080"
    ]
    assert document.spec.routes == app_spec.routes
    report = document.spec.routes[1]
    assert report.auth is not None and report.auth.minTrustLevel == 2
    assert report.rateLimit is not None and report.rateLimit.onStoreError == "closed"
    owned_by_namespace = render.render_city_service(AppRef("web", "parks", "u"), app_spec, SETTINGS)
    assert owned_by_namespace.spec.owner == "parks"


def test_public_url_from_route_host_or_gateway_url() -> None:
    assert (
        render.public_url(spec(), "https://api.city.example/")
        == "https://api.city.example/tracker/"
    )
    assert render.public_url(spec(), None) is None
    routes = copy.deepcopy(example()["spec"]["routes"])
    routes[0]["match"]["host"] = "tracker.city.example"
    assert render.public_url(spec(routes=routes), None) == "https://tracker.city.example/tracker/"


def test_names_fit_their_limits() -> None:
    long = AppRef(name="a" * 60, namespace="n" * 40, uid="u")
    assert len(registry_name(long)) <= 63 and len(client_id(long)) <= 63
    assert registry_name(long) != registry_name(
        AppRef(name="a" * 59 + "b", namespace="n" * 40, uid="u")
    )
    with pytest.raises(InvalidName, match="RFC 1035"):
        AppRef(name="9lives", namespace="x", uid="u").check()
    with pytest.raises(InvalidName, match="registry-name"):
        AppRef(
            name="ok",
            namespace="x",
            uid="u",
            annotations={"cityplane.io/registry-name": "Not Valid"},
        ).check()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"replicas": 2}, "give either replicas or autoscaling, not both"),
        ({"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}, "minReplicas must not be greater"),
        (
            {"port": 0, "image": "UPPER/case"},
            "spec.port: Input should be greater than or equal to 1",
        ),
        (
            {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]},
            "env names must be unique",
        ),
        (
            {"identity": {"publicClient": True, "grantTypes": ["client_credentials"]}},
            "a public client cannot use the client_credentials grant",
        ),
        ({"identity": {"redirectUris": ["http://evil.example/cb"]}}, "must be https"),
        ({"identity": {"grantTypes": ["authorization_code"]}}, "needs at least one redirect URI"),
        ({"routes": []}, "spec.routes: List should have at least 1 item"),
        ({"resources": {"limits": {"cpu": "lots"}}}, "spec.resources.limits.cpu"),
    ],
)
def test_invalid_specs_are_described_with_the_field(change: dict[str, Any], message: str) -> None:
    document = {**copy.deepcopy(example()["spec"]), **change}
    with pytest.raises(ValidationError) as caught:
        AppSpec.model_validate(document)
    assert message in describe(caught.value)


def test_workload_condition_follows_the_deployment_status() -> None:
    app_spec = spec()
    live = {
        "metadata": {"generation": 3},
        "status": {"observedGeneration": 3, "readyReplicas": 2, "updatedReplicas": 2},
    }
    assert workload_condition(live, app_spec).status == "True"
    stale = {**live, "status": {**live["status"], "observedGeneration": 2}}
    assert workload_condition(stale, app_spec).reason == "Progressing"
    short = {**live, "status": {**live["status"], "readyReplicas": 1}}
    assert workload_condition(short, app_spec).message.startswith("1/2 pods ready")
    assert workload_condition({}, spec(autoscaling=None, replicas=0)).reason == "ScaledToZero"
