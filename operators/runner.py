"""Run the CityApp operator: kopf plus the health server, in one event loop."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
from kubernetes import client

from operators import kube
from operators.handlers import Login, Timing, build_registry
from operators.metrics import OperatorMetrics, start_health_server
from operators.reconcile import AppReconciler, Dependencies, Endpoint
from operators.render import DEFAULT_GATEWAY_SELECTOR, RenderSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OperatorSettings:
    registry: Endpoint
    identity: Endpoint
    namespace: str | None = None  # None: every namespace (cluster-wide)
    gateway_namespace: str | None = None
    gateway_selector: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_GATEWAY_SELECTOR))
    gateway_url: str | None = None
    cluster_domain: str = "cluster.local"
    health_host: str = "0.0.0.0"  # the kubelet probes the pod's IP
    health_port: int | None = 8082  # None: no health server
    peering: str | None = None  # None: standalone (one replica, Deployment strategy Recreate)
    kubeconfig: Path | None = None  # None: in-cluster, else $KUBECONFIG / ~/.kube/config
    timing: Timing = field(default_factory=Timing)
    http_timeout: float = 10.0


def default_login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """kopf's own login: the service account in a pod, else the kubeconfig."""
    return kopf.login_via_client(**kwargs)


def login_for(settings: OperatorSettings) -> Login:
    """The watches log in where the writes go: ``--kubeconfig`` when given (kopf reads the
    variable at login time), else kopf's default."""
    if settings.kubeconfig is None:
        return default_login
    path = str(settings.kubeconfig)

    def with_kubeconfig(**kwargs: Any) -> kopf.ConnectionInfo | None:
        os.environ["KUBECONFIG"] = path
        return kopf.login_with_kubeconfig(**kwargs)

    return with_kubeconfig


async def run(
    settings: OperatorSettings,
    *,
    api: client.ApiClient | None = None,
    login: Login | None = None,
    stop_flag: Any = None,
    ready_flag: Any = None,
    health_port_flag: list[int] | None = None,
) -> None:
    """Run until ``stop_flag`` is set (or a signal stops kopf). ``api`` and ``login`` point
    the Kubernetes writes and kopf's watches at a server (tests use an emulator)."""
    metrics = OperatorMetrics()
    if api is None:
        kubeconfig = str(settings.kubeconfig) if settings.kubeconfig else None
        api = await asyncio.to_thread(kube.api_client, kubeconfig)
    deps = Dependencies(
        kube=kube.KubeObjects(api, timeout=settings.http_timeout),
        registry=settings.registry,
        hub=settings.identity,
        render=RenderSettings(
            gateway_namespace=settings.gateway_namespace,
            gateway_selector=dict(settings.gateway_selector),
            cluster_domain=settings.cluster_domain,
        ),
        gateway_url=settings.gateway_url,
        http_timeout=settings.http_timeout,
    )
    registry = build_registry(
        AppReconciler(deps), metrics, settings.timing, login or login_for(settings)
    )
    runner = None
    if settings.health_port is not None:
        runner, port = await start_health_server(
            metrics, settings.health_host, settings.health_port
        )
        log.info("health and metrics on port %d", port)
        if health_port_flag is not None:
            health_port_flag.append(port)
    try:
        await kopf.operator(
            registry=registry,
            clusterwide=settings.namespace is None,
            namespaces=[settings.namespace] if settings.namespace else (),
            standalone=settings.peering is None,
            peering_name=settings.peering,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
            memo=kopf.Memo(),
        )
    finally:
        if runner is not None:
            await runner.cleanup()


def run_in_thread(
    settings: OperatorSettings,
    *,
    api: client.ApiClient | None = None,
    login: Login | None = None,
) -> tuple[threading.Thread, threading.Event, threading.Event]:
    """Start the operator in a thread of its own (its own event loop); answers the thread, the
    stop flag to set and the ready flag kopf sets once it watches."""
    stop, ready = threading.Event(), threading.Event()

    def main() -> None:
        asyncio.run(run(settings, api=api, login=login, stop_flag=stop, ready_flag=ready))

    thread = threading.Thread(target=main, name="cityplane-operator", daemon=True)
    thread.start()
    return thread, stop, ready
