"""The parts of one running registry, as its HTTP handlers reach them (`request.app[STATE]`)."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.membership import InstanceStore
from registry.metrics import RegistryMetrics
from registry.notifier import Notifier
from registry.store import ServiceStore


@dataclass(slots=True)
class RegistryState:
    engine: AsyncEngine
    store: ServiceStore
    instances: InstanceStore
    notifier: Notifier
    metrics: RegistryMetrics
    heartbeat: float
    openapi: bytes
    migrated: bool = False


STATE = web.AppKey("registry", RegistryState)
