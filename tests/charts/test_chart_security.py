"""Every pod the chart renders passes the `restricted` Pod Security Standard, and the parts get
only the Kubernetes API access they use."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.charts.chart_support import (
    RELEASE,
    ROOT,
    find,
    of_kind,
    pod_specs,
    production_values,
    render,
)

FULL = f"{RELEASE}-cityplane"
VALUE_SETS = {
    "default": {},
    "production": production_values(),
    "minimal": {"identity": {"enabled": False}, "operator": {"enabled": False}},
}

# https://kubernetes.io/docs/concepts/security/pod-security-standards/ (v1.30, "Restricted",
# which includes every "Baseline" control).
ALLOWED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """The controls of the restricted profile a pod spec breaks (empty: it passes)."""
    problems = []
    pod_sc = spec.get("securityContext") or {}
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(host):
            problems.append(f"{host} is set")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUME_TYPES:
            problems.append(f"volume {volume['name']} of type {sorted(kinds)}")
    for sysctl in pod_sc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            problems.append(f"unsafe sysctl {sysctl['name']}")
    if (pod_sc.get("seLinuxOptions") or {}).get("user") or (pod_sc.get("seLinuxOptions") or {}).get(
        "role"
    ):
        problems.append("pod seLinuxOptions user/role")
    if pod_sc.get("runAsUser") == 0:
        problems.append("pod runAsUser 0")
    if (pod_sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        problems.append("pod AppArmor Unconfined")
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        problems.append(f"pod seccomp {pod_seccomp}")
    containers = spec.get("containers", []) + spec.get("initContainers", [])
    containers += spec.get("ephemeralContainers", [])
    for each in containers:
        name = each["name"]
        sc = each.get("securityContext") or {}
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{name}: capabilities not dropping ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities {caps['add']}")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            problems.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccomp profile {seccomp}")
        if sc.get("procMount", "Default") != "Default":
            problems.append(f"{name}: procMount {sc['procMount']}")
        if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
            problems.append(f"{name}: AppArmor Unconfined")
        for port in each.get("ports", []):
            if port.get("hostPort"):
                problems.append(f"{name}: hostPort {port['hostPort']}")
    return problems


def test_the_checker_catches_what_the_restricted_profile_forbids() -> None:
    bad = {
        "hostNetwork": True,
        "volumes": [{"name": "host", "hostPath": {"path": "/"}}],
        "containers": [
            {
                "name": "c",
                "securityContext": {"privileged": True, "capabilities": {"add": ["SYS_ADMIN"]}},
                "ports": [{"containerPort": 80, "hostPort": 80}],
            }
        ],
    }
    problems = " | ".join(restricted_violations(bad))
    for control in (
        "hostNetwork",
        "hostPath",
        "privileged",
        "not dropping ALL",
        "SYS_ADMIN",
        "allowPrivilegeEscalation",
        "runAsNonRoot",
        "seccomp",
        "hostPort",
    ):
        assert control in problems


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_pod_passes_the_restricted_pod_security_standard(value_set: str) -> None:
    specs = dict(pod_specs(render(VALUE_SETS[value_set])))
    assert specs, "no pods rendered"
    assert {where: restricted_violations(spec) for where, spec in specs.items()} == {
        where: [] for where in specs
    }


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_container_has_a_read_only_root_and_a_writable_tmp(value_set: str) -> None:
    for where, spec in pod_specs(render(VALUE_SETS[value_set])):
        empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for each in spec["containers"]:
            assert each["securityContext"]["readOnlyRootFilesystem"] is True, where
            tmp = [m for m in each["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert [m["name"] in empty_dirs for m in tmp] == [True], where


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_no_pod_gets_service_link_variables_that_the_cli_would_read_as_settings(
    value_set: str,
) -> None:
    # A Service "<release>-registry" would inject CITYPLANE_REGISTRY_PORT=tcp://… and the CLI
    # reads CITYPLANE_* as its settings.
    for where, spec in pod_specs(render(VALUE_SETS[value_set])):
        assert spec.get("enableServiceLinks") is False, where


def test_the_pods_run_as_the_user_the_image_declares() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    users = re.findall(r"^USER\s+(\d+)(?::(\d+))?\s*$", dockerfile, re.MULTILINE)
    assert users, "the Dockerfile must end with a numeric USER"
    uid, gid = users[-1]
    for where, spec in pod_specs(render()):
        assert spec["securityContext"]["runAsUser"] == int(uid), where
        if gid:
            assert spec["securityContext"]["runAsGroup"] == int(gid), where


def test_only_the_operator_gets_a_kubernetes_api_token() -> None:
    objects = render()
    for where, spec in pod_specs(objects):
        if where == f"Deployment/{FULL}-operator":
            assert spec["serviceAccountName"] == f"{FULL}-operator"
            assert spec.get("automountServiceAccountToken", True) is True
        else:
            assert spec["automountServiceAccountToken"] is False, where
    shared = find(objects, "ServiceAccount", FULL)
    assert shared["automountServiceAccountToken"] is False


def _grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _documented_operator_grants() -> set[tuple[str, str, str]]:
    """The RBAC table of docs/operator.md (the operator's own account of what it calls),
    without the rows marked "only with" a mode the chart does not use (kopf peering, a
    single watched namespace)."""
    text = (ROOT / "docs" / "operator.md").read_text(encoding="utf-8")
    section = text.split("## RBAC", 1)[1].split("\n## ", 1)[0]
    grants = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`") or "only with" in line:
            continue
        groups = re.findall(r"`([^`]*)`", cells[0])
        resources = re.findall(r"`([^`]*)`", cells[1])
        verbs = [v.strip() for v in cells[2].split(",")]
        grants |= {(g.strip('"'), r, v) for g in groups for r in resources for v in verbs}
    return grants


def test_the_operator_role_grants_exactly_what_docs_operator_md_lists() -> None:
    objects = render()
    role = find(objects, "ClusterRole", f"{FULL}-operator")
    grants = _grants(role["rules"])
    assert not any("*" in grant for grant in grants), "no wildcards"
    documented = _documented_operator_grants()
    assert ("cityplane.io", "cityapps", "watch") in documented  # the table was found
    # One addition: children set blockOwnerDeletion, which the OwnerReferencesPermissionEnforcement
    # admission plugin (OpenShift, hardened clusters) allows only with update on finalizers.
    assert grants == documented | {("cityplane.io", "cityapps/finalizers", "update")}
    binding = find(objects, "ClusterRoleBinding", f"{FULL}-operator")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": f"{FULL}-operator", "namespace": "cityplane"}
    ]
    assert of_kind(objects, "Role") == [] and of_kind(objects, "RoleBinding") == []


def test_the_operator_runs_alone_and_is_replaced_not_overlapped() -> None:
    deployment = find(render(), "Deployment", f"{FULL}-operator")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_network_policies_admit_to_the_registry_only_the_parts_that_call_it() -> None:
    objects = render()
    policy = find(objects, "NetworkPolicy", f"{FULL}-registry")
    (rule,) = policy["spec"]["ingress"]
    components = {
        peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in rule["from"]
    }
    assert components == {"gateway", "operator", "tests"}
    # Each peer selects pods this chart actually labels so (the helm test Pod included).
    labelled = {
        spec_labels["app.kubernetes.io/component"]
        for obj in objects
        if obj["kind"] in ("Deployment", "Pod")
        for spec_labels in [
            obj["spec"]["template"]["metadata"]["labels"]
            if obj["kind"] == "Deployment"
            else obj["metadata"]["labels"]
        ]
    }
    assert components <= labelled
