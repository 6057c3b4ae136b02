"""The registry's Prometheus metrics, in a registry of their own.

Per instance, not the process-wide default: `cityplane up` runs the gateway and the registry in
one process, and tests start several registries; each `/metrics` shows its own numbers.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class RegistryMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cityplane_registry_requests_total",
            "Admin API requests answered, by method and status.",
            ["method", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "cityplane_registry_request_duration_seconds",
            "Admin API request duration (watch streams excluded).",
            ["method"],
            registry=self.registry,
        )
        self.revision = Gauge(
            "cityplane_registry_revision",
            "The newest revision this registry has seen committed.",
            registry=self.registry,
        )
        self.changes = Counter(
            "cityplane_registry_changes_total",
            "Changes committed by this registry, by action.",
            ["action"],
            registry=self.registry,
        )
        self.watchers = Gauge(
            "cityplane_registry_watchers",
            "Open watch streams.",
            registry=self.registry,
        )
        self.watch_events = Counter(
            "cityplane_registry_watch_events_total",
            "Events sent on watch streams, by event (snapshot, change, heartbeat).",
            ["event"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
