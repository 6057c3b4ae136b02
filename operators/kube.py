"""Create-or-patch of the app's children through the public ``kubernetes`` client.

Blocking (urllib3) on purpose: kopf has no public client for arbitrary objects, so these calls
run in a worker thread (``asyncio.to_thread``) from the async handlers. A child is read first
and patched only when it lacks something wanted: an idempotent handler, and a drift check that
writes nothing (and wakes no watcher) when nothing drifted.

Patches are JSON merge patches (RFC 7386): a list is replaced as a whole, so an env variable
removed from the CityApp disappears from the Deployment (a strategic merge would keep it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from kubernetes import client, config

# apiVersion, kind -> the plural of the resource (all the children are namespaced).
PLURALS: dict[tuple[str, str], str] = {
    ("v1", "Service"): "services",
    ("v1", "Secret"): "secrets",
    ("apps/v1", "Deployment"): "deployments",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
}

Action = Literal["created", "patched", "unchanged"]


class KubeError(Exception):
    """The Kubernetes API refused or failed a request."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"{status}: {message}")

    @property
    def transient(self) -> bool:
        # 422 (invalid) and 400 will fail the same way again; the rest may heal (a conflict, an
        # API server restarting, RBAC being fixed, a namespace being created).
        return self.status not in (400, 422)


def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """An ApiClient of its own (no global default): in-cluster, else the kubeconfig."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return client.ApiClient(configuration)


def _path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    plural = PLURALS[(api_version, kind)]
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{base}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


def contains(live: Any, wanted: Any) -> bool:
    """Whether ``live`` has everything in ``wanted`` (the API server adds defaults; those are
    not drift). Lists must match item by item and in length."""
    if isinstance(wanted, dict):
        return isinstance(live, dict) and all(
            key in live and contains(live[key], value) for key, value in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(live, list)
            and len(live) == len(wanted)
            and all(contains(a, b) for a, b in zip(live, wanted, strict=True))
        )
    return bool(live == wanted)


@dataclass(frozen=True, slots=True)
class Applied:
    kind: str
    name: str
    action: Action
    live: dict[str, Any]


class KubeObjects:
    """Read, create-or-patch and delete the kinds in :data:`PLURALS`."""

    def __init__(self, api: client.ApiClient, *, timeout: float = 10.0) -> None:
        self._api = api
        self._timeout = timeout

    def _request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> tuple[int, Any]:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        _, url, headers, body, _ = self._api.param_serialize(
            method, path, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        try:
            response = self._api.call_api(
                method, url, header_params=headers, body=body, _request_timeout=self._timeout
            )
            response.read()
        except client.ApiException as exc:
            return int(exc.status or 500), _json(exc.body)
        except Exception as exc:  # noqa: BLE001 - urllib3's errors: no API server to talk to
            raise KubeError(503, f"cannot reach the Kubernetes API: {exc}") from None
        return int(response.status), _json(response.data)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        status, body = self._request("GET", _path(api_version, kind, namespace, name))
        if status == 404:
            return None
        _check(status, body, f"read {kind} {namespace}/{name}")
        return dict(body)

    def apply(self, wanted: dict[str, Any]) -> Applied:
        """Create ``wanted``, or merge-patch the live object when it lacks something of it."""
        api_version, kind = wanted["apiVersion"], wanted["kind"]
        namespace, name = wanted["metadata"]["namespace"], wanted["metadata"]["name"]
        live = self.get(api_version, kind, namespace, name)
        if live is None:
            status, body = self._request("POST", _path(api_version, kind, namespace), wanted)
            if status != 409:  # 409: created meanwhile (another reconcile): patch it below
                _check(status, body, f"create {kind} {namespace}/{name}")
                return Applied(kind, name, "created", dict(body))
            live = self.get(api_version, kind, namespace, name) or {}
        if contains(live, wanted):
            return Applied(kind, name, "unchanged", live)
        status, body = self._request(
            "PATCH",
            _path(api_version, kind, namespace, name),
            wanted,
            content_type="application/merge-patch+json",
        )
        _check(status, body, f"patch {kind} {namespace}/{name}")
        return Applied(kind, name, "patched", dict(body))

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        status, body = self._request("DELETE", _path(api_version, kind, namespace, name))
        if status == 404:
            return False
        _check(status, body, f"delete {kind} {namespace}/{name}")
        return True


def _json(raw: Any) -> Any:
    if isinstance(raw, bytes | str) and raw:
        try:
            return json.loads(raw)
        except ValueError:
            return None
    return None


def _check(status: int, body: Any, what: str) -> None:
    if status < 400:
        if not isinstance(body, dict):
            raise KubeError(502, f"{what}: the API server answered without an object")
        return
    message = body.get("message") if isinstance(body, dict) else None
    raise KubeError(status, f"{what}: {message or 'failed'}")
