"""The chart renders with the real Helm engine, lints clean and yields valid Kubernetes 1.30+
objects, for the default (embedded) values and the production-like ones."""

from __future__ import annotations

import shlex
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from cityplane.cli import build_parser
from tests.charts.chart_support import (
    CHART,
    CRD_KINDS,
    NAMESPACE,
    RELEASE,
    container,
    env_of,
    find,
    ident,
    notes,
    of_kind,
    pod_specs,
    production_values,
    render,
    render_files,
)

FULL = f"{RELEASE}-cityplane"
VALUE_SETS = {"default": {}, "production": production_values()}


@pytest.mark.parametrize("kube_version", ["1.30.0", "1.33.0"])
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_rendered_object_validates_against_the_kubernetes_schemas(
    value_set: str, kube_version: str
) -> None:
    problems = []
    for obj in render(VALUE_SETS[value_set]):
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{ident(obj)}: {exc.message} at {'.'.join(map(str, exc.path))}")
    assert problems == []


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_helm_lint_is_clean_in_strict_mode(value_set: str) -> None:
    report = helm.lint(CHART, VALUE_SETS[value_set], strict=True, kube_version="v1.30.0")
    # Severity 1 is "info" (e.g. "icon is recommended"); warnings (2) and errors (3) fail.
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_default_install_is_the_embedded_single_replica_mode() -> None:
    objects = render()
    for part in ("registry", "identity"):
        deployment = find(objects, "Deployment", f"{FULL}-{part}")
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        claim = volumes["data"]["persistentVolumeClaim"]["claimName"]
        assert find(objects, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == [
            "ReadWriteOnce"
        ]
        assert "CITYPLANE_DATABASE_URL" not in env_of(container(objects, f"{FULL}-{part}"))
    assert "CITYPLANE_REDIS_URL" not in env_of(container(objects, f"{FULL}-gateway"))
    assert of_kind(objects, "HorizontalPodAutoscaler") == []
    assert of_kind(objects, "PodDisruptionBudget") == []  # one replica: a PDB would block drains
    assert of_kind(objects, "ServiceMonitor") == []


def test_production_values_use_external_databases_and_an_autoscaled_gateway() -> None:
    objects = render(production_values())
    hpa = find(objects, "HorizontalPodAutoscaler", f"{FULL}-gateway")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 20)
    assert "replicas" not in find(objects, "Deployment", f"{FULL}-gateway")["spec"]  # HPA owns it
    assert find(objects, "PodDisruptionBudget", f"{FULL}-gateway")["spec"]["maxUnavailable"] == 1
    for part, database in (("registry", "cityplane_registry"), ("identity", "cityplane_identity")):
        env = env_of(container(objects, f"{FULL}-{part}"))
        assert env["POSTGRESQL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "cityplane-postgresql",
            "key": "password",
        }
        assert env["CITYPLANE_DATABASE_URL"]["value"] == (
            "postgresql+asyncpg://cityplane:$(POSTGRESQL_PASSWORD)"
            f"@postgresql.databases.svc:5432/{database}?ssl=require"
        )
        assert of_kind(objects, "PersistentVolumeClaim") == []
    gateway_env = env_of(container(objects, f"{FULL}-gateway"))
    assert gateway_env["CITYPLANE_REDIS_URL"]["value"] == (
        "rediss://:$(REDIS_PASSWORD)@redis-master.databases.svc:6379/0"
    )
    # $(VAR) expands only from entries listed earlier in the same env list.
    names = [e["name"] for e in container(objects, f"{FULL}-gateway")["env"]]
    assert names.index("REDIS_PASSWORD") < names.index("CITYPLANE_REDIS_URL")
    assert {m["metadata"]["name"] for m in of_kind(objects, "ServiceMonitor")} == {
        f"{FULL}-{part}" for part in ("gateway", "registry", "identity", "operator")
    }
    ingress = find(objects, "Ingress", f"{FULL}-gateway")
    assert ingress["spec"]["tls"] == [
        {"hosts": ["api.city.example"], "secretName": "api-city-example-tls"}
    ]


def test_every_service_monitor_scrapes_a_port_of_a_service_it_selects() -> None:
    objects = render(production_values())
    for monitor in of_kind(objects, "ServiceMonitor"):
        wanted = monitor["spec"]["selector"]["matchLabels"]
        services = [
            s
            for s in of_kind(objects, "Service")
            if wanted.items() <= s["metadata"]["labels"].items()
        ]
        assert len(services) == 1, ident(monitor)
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in {p["name"] for p in services[0]["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"


def test_the_public_gateway_service_exposes_only_the_proxy_port() -> None:
    objects = render()
    public = find(objects, "Service", f"{FULL}-gateway")
    assert [p["targetPort"] for p in public["spec"]["ports"]] == ["http"]
    status = find(objects, "Service", f"{FULL}-gateway-status")
    assert [p["targetPort"] for p in status["spec"]["ports"]] == ["status"]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_container_has_probes_and_resources(value_set: str) -> None:
    for where, spec in pod_specs(render(VALUE_SETS[value_set])):
        for each in spec["containers"]:
            assert "livenessProbe" in each, f"{where}: {each['name']} has no liveness probe"
            if where.startswith("Deployment/"):
                assert "readinessProbe" in each, f"{where}: {each['name']}"
            assert each["resources"]["requests"], f"{where}: {each['name']}"
            assert each["resources"]["limits"]["memory"], f"{where}: {each['name']}"


def test_the_image_tag_defaults_to_the_chart_app_version_and_a_digest_pins_it() -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert container(render(), f"{FULL}-gateway")["image"] == (
        f"ghcr.io/cityplane/cityplane:{app_version}"
    )
    digest = "sha256:" + "ab" * 32
    pinned = render({"image": {"digest": digest}, "global": {"imageRegistry": "mirror.city"}})
    for _, spec in pod_specs(pinned):
        assert {c["image"] for c in spec["containers"]} == {
            f"mirror.city/cityplane/cityplane@{digest}"
        }


def test_a_settings_change_rolls_only_the_pods_that_read_it() -> None:
    def checksums(values: dict[str, Any]) -> dict[str, str]:
        objects = render(values)
        return {
            d["metadata"]["name"]: d["spec"]["template"]["metadata"]["annotations"][
                "checksum/config"
            ]
            for d in of_kind(objects, "Deployment")
        }

    before = checksums({})
    after = checksums({"gateway": {"env": {"CITYPLANE_MAX_BODY": "1024"}}})
    assert after[f"{FULL}-gateway"] != before[f"{FULL}-gateway"]
    assert {k: v for k, v in after.items() if k != f"{FULL}-gateway"} == {
        k: v for k, v in before.items() if k != f"{FULL}-gateway"
    }
    # A new database password (chart-managed Secret) rolls the pods that use it.
    prod = production_values()
    prod["postgresql"] |= {"existingSecret": "", "password": "one"}
    first = render(prod)
    prod["postgresql"]["password"] = "two"
    second = render(prod)
    name = f"{FULL}-registry"
    annotations = [
        find(objs, "Deployment", name)["spec"]["template"]["metadata"]["annotations"]
        for objs in (first, second)
    ]
    assert annotations[0]["checksum/external-secret"] != annotations[1]["checksum/external-secret"]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_gateway_and_registry_arguments_are_accepted_by_the_real_command_line(
    value_set: str,
) -> None:
    objects = render(VALUE_SETS[value_set])
    parser = build_parser()
    gateway = parser.parse_args(container(objects, f"{FULL}-gateway")["args"])
    assert gateway.registry == f"http://{FULL}-registry.{NAMESPACE}.svc:8090"
    assert (gateway.host, gateway.port, gateway.status_port) == ("0.0.0.0", 8080, 8081)
    assert str(gateway.state_dir) == "/var/lib/cityplane/gateway"
    registry = parser.parse_args(container(objects, f"{FULL}-registry")["args"])
    assert (registry.host, registry.port, str(registry.data_dir)) == ("0.0.0.0", 8090, "/data")


def test_every_mounted_token_file_comes_from_the_admin_token_secret() -> None:
    objects = render()
    secret = find(objects, "Secret", f"{FULL}-admin-tokens")
    for name, flag in (
        ("gateway", "--registry-token-file"),
        ("registry", "--admin-token-file"),
        ("identity", "--admin-token-file"),
        ("operator", "--registry-token-file"),
        ("operator", "--identity-token-file"),
    ):
        spec = find(objects, "Deployment", f"{FULL}-{name}")["spec"]["template"]["spec"]
        (main,) = spec["containers"]
        path = next(a.split("=", 1)[1] for a in main["args"] if a.startswith(flag + "="))
        mount = next(m for m in main["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])["secret"]
        assert volume["secretName"] == secret["metadata"]["name"], f"{name} {flag}"
        (item,) = volume["items"]
        assert item["key"] in secret["data"]
        assert path == f"{mount['mountPath']}/{item['path']}"


def test_helm_test_pod_calls_the_gateway_readyz_and_the_hub_discovery_document() -> None:
    objects = render()
    pod = find(objects, "Pod", f"{FULL}-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["args"][0]
    compile(script, "helm-test", "exec")  # what the Pod runs is valid Python
    status = find(objects, "Service", f"{FULL}-gateway-status")
    assert f"http://{FULL}-gateway-status:{status['spec']['ports'][0]['port']}/readyz" in script
    hub = find(objects, "Service", f"{FULL}-identity")
    assert (
        f"http://{FULL}-identity.{NAMESPACE}.svc:{hub['spec']['ports'][0]['port']}"
        "/.well-known/openid-configuration" in script
    )


def test_notes_say_how_to_reach_the_gateway_get_the_admin_token_and_apply_a_resource() -> None:
    text = notes()
    assert f"port-forward svc/{FULL}-gateway" in text
    assert f"get secret {FULL}-admin-tokens -o jsonpath='{{.data.registry}}'" in text
    assert "kubectl apply -f examples/k8s/" in text
    assert "embedded mode" in text
    prod = render_files(production_values())[f"{CHART.name}/templates/NOTES.txt"]
    assert "https://api.city.example/" in prod
    assert "https://id.city.example/.well-known/openid-configuration" in prod
    assert "embedded mode" not in prod


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"registry": {"replicaCount": 2}}, "registry.replicaCount > 1 needs postgresql.enabled"),
        ({"postgresql": {"enabled": True}}, "postgresql.enabled needs postgresql.host"),
        (
            {"postgresql": {"enabled": True, "host": "db"}},
            "needs postgresql.existingSecret or postgresql.password",
        ),
        ({"redis": {"enabled": True}}, "redis.enabled needs redis.host"),
        (
            {"gateway": {"autoscaling": {"enabled": True}, "resources": {"requests": None}}},
            "needs gateway.resources.requests.cpu",
        ),
        (
            {"gateway": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
            "minReplicas must not exceed maxReplicas",
        ),
        (
            {
                "identity": {"replicaCount": 3},
                "postgresql": {"enabled": True, "host": "db", "password": "p"},
            },
            "identity.replicaCount > 1 needs postgresql.enabled and redis.enabled",
        ),
        (
            {"identity": {"keySecret": {"previousKey": "old"}}},
            "identity.keySecret.previousKey needs identity.keySecret.existingSecret",
        ),
    ],
)
def test_values_that_cannot_work_fail_with_a_message_that_says_why(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        render(values)


def test_plain_passwords_land_in_a_chart_secret_and_never_in_the_pod_spec() -> None:
    values = {
        "postgresql": {"enabled": True, "host": "db", "password": "s3cret-pg"},
        "redis": {"enabled": True, "host": "cache", "password": "s3cret-redis"},
    }
    objects = render(values)
    secret = find(objects, "Secret", f"{FULL}-external")
    assert set(secret["data"]) == {"postgresql-password", "redis-password"}
    for _, spec in pod_specs(objects):
        assert "s3cret" not in yaml.safe_dump(spec)
    args = shlex.join(container(objects, f"{FULL}-gateway")["args"])
    assert "redis" not in args.replace(f"{FULL}-registry", "")  # the URL is env-only


def test_operator_arguments_are_accepted_and_admit_exactly_this_releases_gateway() -> None:
    objects = render(production_values())
    operator = build_parser().parse_args(container(objects, f"{FULL}-operator")["args"])
    assert operator.registry == f"http://{FULL}-registry.{NAMESPACE}.svc:8090"
    assert operator.identity == f"http://{FULL}-identity.{NAMESPACE}.svc:8070"
    assert operator.gateway_namespace == NAMESPACE
    assert operator.gateway_url == "https://api.city.example"
    gateway_pods = find(objects, "Deployment", f"{FULL}-gateway")["spec"]["template"]["metadata"]
    assert operator.gateway_selector.items() <= gateway_pods["labels"].items()
    others = [
        d for d in of_kind(objects, "Deployment") if d["metadata"]["name"] != f"{FULL}-gateway"
    ]
    for deployment in others:  # the selector picks the gateway and nothing else
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert not operator.gateway_selector.items() <= labels.items()
    probe = container(objects, f"{FULL}-operator")["livenessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/healthz", "health")
    ports = container(objects, f"{FULL}-operator")["ports"]
    assert ports == [{"name": "health", "containerPort": operator.health_port, "protocol": "TCP"}]


def test_identity_arguments_are_accepted_by_the_real_command_line() -> None:
    objects = render(production_values())
    args = container(objects, f"{FULL}-identity")["args"]
    parser = build_parser()
    try:
        hub = parser.parse_args(args)
    except SystemExit:
        pytest.skip("`cityplane identity` does not take --issuer/--data-dir/--admin-token-file yet")
    assert hub.issuer == "https://id.city.example"
    assert (hub.host, hub.port) == ("0.0.0.0", 8070)


def _key_secret_files(objects: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """flag -> (Secret, key) for each key-secret flag of the hub, followed through its mount."""
    spec = find(objects, "Deployment", f"{FULL}-identity")["spec"]["template"]["spec"]
    (main,) = spec["containers"]
    hub = build_parser().parse_args(main["args"])
    found = {}
    for flag, path in (
        ("--key-secret-file", hub.key_secret_file),
        ("--previous-key-secret-file", hub.previous_key_secret_file),
    ):
        if path is None:
            continue
        mount = next(m for m in main["volumeMounts"] if str(path.parent) == m["mountPath"])
        assert mount["readOnly"] is True
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])["secret"]
        key = next(i["key"] for i in volume["items"] if i["path"] == path.name)
        found[flag] = (volume["secretName"], key)
    return found


def test_the_hub_reads_its_key_secret_from_an_existing_secret_mounted_as_a_file() -> None:
    assert _key_secret_files(render()) == {}  # embedded: the hub makes its own on its PVC
    assert _key_secret_files(render(production_values())) == {
        "--key-secret-file": ("cityplane-identity-key", "key-secret")
    }
    rotating = {"keySecret": {"existingSecret": "hub-keys", "key": "new", "previousKey": "old"}}
    objects = render({"identity": rotating})
    assert _key_secret_files(objects) == {
        "--key-secret-file": ("hub-keys", "new"),
        "--previous-key-secret-file": ("hub-keys", "old"),
    }
    for _, pod in pod_specs(objects):  # the secret's value is never in a spec, only its name
        for c in pod["containers"]:
            assert not any("KEY_SECRET" in e["name"] for e in c.get("env", []))


def test_notes_warn_when_the_hub_keeps_plain_signing_keys_in_postgresql() -> None:
    warning = "stores its signing keys unencrypted in PostgreSQL"
    prod = production_values()
    assert warning not in render_files(prod)[f"{CHART.name}/templates/NOTES.txt"]
    prod["identity"].pop("keySecret")
    assert warning in render_files(prod)[f"{CHART.name}/templates/NOTES.txt"]
    assert warning not in notes()  # embedded: keys sealed with the hub's own secret
