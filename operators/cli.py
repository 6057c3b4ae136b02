"""``cityplane operator``: the command line of the CityApp operator (docs/operator.md).

The Helm chart relies on these flags and environment variables; change them only together
with ``charts/cityplane``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from operators.render import DEFAULT_GATEWAY_SELECTOR

if TYPE_CHECKING:
    from operators.runner import OperatorSettings

EXIT_USAGE = 2


class OperatorUsageError(Exception):
    """Missing or malformed settings; one line for the command line."""


def parse_selector(text: str) -> dict[str, str]:
    """``k=v,k2=v2`` -> a label selector's matchLabels."""
    labels: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{part!r} is not key=value")
        labels[key.strip()] = value.strip()
    if not labels:
        raise argparse.ArgumentTypeError("the selector needs at least one key=value")
    return labels


def add_operator_parser(sub: Any) -> argparse.ArgumentParser:
    env = os.environ.get
    p: argparse.ArgumentParser = sub.add_parser(
        "operator", help="run the Kubernetes operator (CityApp -> workload, routes, OIDC client)"
    )
    p.add_argument(
        "--registry",
        default=env("CITYPLANE_REGISTRY_URL"),
        metavar="URL",
        help="registry admin API (env CITYPLANE_REGISTRY_URL)",
    )
    p.add_argument(
        "--registry-token-file",
        type=Path,
        metavar="PATH",
        default=env("CITYPLANE_REGISTRY_TOKEN_FILE"),
        help="bearer token for the registry (env CITYPLANE_REGISTRY_TOKEN_FILE)",
    )
    p.add_argument(
        "--identity",
        default=env("CITYPLANE_IDENTITY_URL"),
        metavar="URL",
        help="identity hub admin API (env CITYPLANE_IDENTITY_URL)",
    )
    p.add_argument(
        "--identity-token-file",
        type=Path,
        metavar="PATH",
        default=env("CITYPLANE_IDENTITY_TOKEN_FILE"),
        help="bearer token for the hub's admin API (env CITYPLANE_IDENTITY_TOKEN_FILE)",
    )
    p.add_argument(
        "--namespace",
        metavar="NS",
        default=None,
        help="watch only this namespace (default: all namespaces)",
    )
    p.add_argument(
        "--gateway-namespace",
        metavar="NS",
        default=None,
        help="namespace of the gateway pods allowed in by NetworkPolicies "
        "(default: the namespace of each CityApp)",
    )
    p.add_argument(
        "--gateway-selector",
        type=parse_selector,
        metavar="K=V,...",
        default=dict(DEFAULT_GATEWAY_SELECTOR),
        help="labels of the gateway pods (default app.kubernetes.io/component=gateway)",
    )
    p.add_argument(
        "--gateway-url",
        default=env("CITYPLANE_GATEWAY_URL"),
        metavar="URL",
        help="public URL of the gateway, for status.url (env CITYPLANE_GATEWAY_URL)",
    )
    p.add_argument(
        "--cluster-domain",
        default="cluster.local",
        help="DNS domain of the cluster, for upstream URLs (default cluster.local)",
    )
    p.add_argument(
        "--health-port", type=int, default=8082, help="port of /healthz and /metrics (default 8082)"
    )
    p.add_argument(
        "--drift-interval",
        type=float,
        default=60.0,
        help="seconds between level-based re-applies of each CityApp (default 60)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--peering",
        metavar="NAME",
        default=None,
        help="kopf peering object: several replicas, one active",
    )
    mode.add_argument(
        "--standalone",
        action="store_true",
        help="no peering (the default): run ONE replica, Deployment strategy Recreate",
    )
    p.add_argument(
        "--kubeconfig",
        type=Path,
        default=None,
        help="outside a cluster: the kubeconfig (default $KUBECONFIG, ~/.kube/config)",
    )
    return p


def settings_from(args: argparse.Namespace) -> OperatorSettings:
    # kopf and the kubernetes client are imported only when the operator runs: every other
    # `cityplane` command imports this module too (for its parser).
    from operators.handlers import Timing
    from operators.reconcile import Endpoint
    from operators.runner import OperatorSettings

    missing = [
        flag
        for flag, value in (
            ("--registry", args.registry),
            ("--registry-token-file", args.registry_token_file),
            ("--identity", args.identity),
            ("--identity-token-file", args.identity_token_file),
        )
        if not value
    ]
    if missing:
        raise OperatorUsageError(f"missing {', '.join(missing)} (or their CITYPLANE_* variables)")
    for flag, path in (
        ("--registry-token-file", args.registry_token_file),
        ("--identity-token-file", args.identity_token_file),
    ):
        if not Path(path).is_file():
            raise OperatorUsageError(f"{flag}: {path} is not a readable file")
    if args.drift_interval <= 0:
        raise OperatorUsageError("--drift-interval must be greater than zero")
    return OperatorSettings(
        registry=Endpoint(args.registry, token_file=Path(args.registry_token_file)),
        identity=Endpoint(args.identity, token_file=Path(args.identity_token_file)),
        namespace=args.namespace,
        gateway_namespace=args.gateway_namespace,
        gateway_selector=dict(args.gateway_selector),
        gateway_url=args.gateway_url,
        cluster_domain=args.cluster_domain,
        health_port=args.health_port,
        peering=args.peering,
        kubeconfig=args.kubeconfig,
        timing=Timing(drift_interval=args.drift_interval),
    )


def run_operator(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
    except OperatorUsageError as exc:
        print(f"cityplane operator: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from operators.runner import run

    logging.getLogger("kopf").setLevel(logging.INFO)
    # kopf handles SIGINT/SIGTERM itself: it stops watching and lets running handlers finish.
    asyncio.run(run(settings))
    return 0
