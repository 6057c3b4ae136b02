"""Build, start and run the registry: `start_registry(settings)` for `cityplane up` and tests,
`run(settings)` for `cityplane registry`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from cityplane.httperrors import ProblemAppRunner
from cityplane.signals import until_stopped
from cityplane.storage import safe_url
from cityplane.telemetry import tracer_provider, tracing_middleware
from cityplane.tokenfile import AdminTokenError, load_or_create_admin_token
from registry import middleware
from registry.api import add_api_routes
from registry.auth import AdminTokenVerifier, Authenticator, TokenVerifier
from registry.bodies import MAX_BODY
from registry.engine import is_postgresql, make_engine, migrate, sqlite_url
from registry.fanout import PostgresFanout
from registry.membership import InstanceStore
from registry.metrics import RegistryMetrics
from registry.notifier import Notifier
from registry.openapi import openapi_bytes
from registry.state import STATE, RegistryState
from registry.status import add_status_routes
from registry.store import ServiceStore
from registry.tokens import HubTokenVerifier

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RegistrySettings:
    host: str = "127.0.0.1"
    port: int = 8090  # 0: any free port (see RunningRegistry.port)
    data_dir: Path = Path(".cityplane")
    database_url: str | None = None  # None: SQLite in <data_dir>/registry/registry.db
    admin_token_file: Path | None = None  # None: <data_dir>/registry/admin-token
    heartbeat: float = 15.0  # seconds of silence on a watch stream before ": heartbeat"
    changes_kept: int = 10_000  # changes kept for watch resume; older `since` gets a snapshot
    reap_interval: float = 1.0  # seconds between looks for instances that missed their TTL
    otlp_endpoint: str | None = None  # OpenTelemetry traces (OTLP/HTTP) when set
    tracer_provider: Any = None  # tests hand in an SDK provider with an in-memory exporter
    # The identity hub whose access tokens are accepted too (None: the admin token only).
    issuer: str | None = None
    jwks_url: str | None = None  # None: from the issuer's discovery document
    audience: str | None = None  # the `aud` tokens must carry (RFC 9068 §4); None: any

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return sqlite_url(self.data_dir / "registry" / "registry.db")

    def resolved_admin_token_file(self) -> Path:
        return self.admin_token_file or self.data_dir / "registry" / "admin-token"


class RegistryStartError(Exception):
    """The registry cannot start; the message is one line for the command line."""


class RunningRegistry:
    def __init__(
        self,
        runner: web.AppRunner,
        state: RegistryState,
        *,
        host: str,
        port: int,
        admin_token: str,
        admin_token_file: Path,
        fanout: PostgresFanout | None,
        reaper: asyncio.Task[None] | None = None,
        hub: HubTokenVerifier | None = None,
    ) -> None:
        self._runner = runner
        self.state = state
        self.port = port
        self.url = f"http://{_url_host(host)}:{port}"
        self.admin_token = admin_token
        self.admin_token_file = admin_token_file
        self._fanout = fanout
        self._reaper = reaper
        self._hub = hub
        self._stopped = False

    @property
    def app(self) -> web.Application:
        return self._runner.app

    @property
    def store(self) -> ServiceStore:
        return self.state.store

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        self.state.notifier.close()  # ends every watch stream at once
        if self._fanout is not None:
            await self._fanout.stop()
        await self._runner.cleanup()
        if self._hub is not None:
            await self._hub.close()
        await self.state.engine.dispose()


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


async def _reap(store: InstanceStore, interval: float) -> None:
    """Expire and remove instances that stopped heartbeating, every `interval` seconds."""
    while True:
        await asyncio.sleep(interval)
        try:
            await store.reap()
        except Exception:  # a dead reaper would leave dead instances routed forever
            log.exception("the instance reaper failed; trying again")


def build_app(
    state: RegistryState, authenticator: Authenticator, tracer: Any = None
) -> web.Application:
    middlewares = [middleware.measured, middleware.problems, authenticator.middleware()]
    if tracer is not None:
        middlewares.insert(0, tracing_middleware(tracer, "cityplane.registry"))
    app = web.Application(client_max_size=MAX_BODY, middlewares=middlewares)
    app[STATE] = state
    add_status_routes(app)
    add_api_routes(app)
    return app


async def _open_database(url: str) -> AsyncEngine:
    try:
        engine = make_engine(url)
    except (ArgumentError, ImportError) as exc:
        raise RegistryStartError(f"database URL {safe_url(url)}: {exc}") from None
    try:
        await migrate(engine)
    except (OSError, SQLAlchemyError) as exc:
        await engine.dispose()
        reason = str(exc).splitlines()[0]
        raise RegistryStartError(f"cannot prepare the database {safe_url(url)}: {reason}") from None
    return engine


async def start_registry(settings: RegistrySettings) -> RunningRegistry:
    """Migrate the database, then listen; raises RegistryStartError (or OSError for the port)."""
    if settings.heartbeat <= 0:
        raise RegistryStartError("heartbeat must be greater than zero")
    if settings.changes_kept < 1:
        raise RegistryStartError("changes_kept must be at least 1")
    if settings.reap_interval <= 0:
        raise RegistryStartError("reap_interval must be greater than zero")
    token_file = settings.resolved_admin_token_file()
    try:
        admin_token = load_or_create_admin_token(token_file)
    except AdminTokenError as exc:
        raise RegistryStartError(str(exc)) from None
    url = settings.resolved_database_url()
    if not settings.database_url:
        (settings.data_dir / "registry").mkdir(parents=True, exist_ok=True, mode=0o700)
    engine = await _open_database(url)

    notifier = Notifier()
    store = ServiceStore(engine, changes_kept=settings.changes_kept, on_commit=notifier.publish)
    notifier.publish(await store.revision())
    metrics = RegistryMetrics()
    metrics.revision.set_function(lambda: notifier.revision)
    instances = InstanceStore(store)
    state = RegistryState(
        engine, store, instances, notifier, metrics, settings.heartbeat, openapi_bytes()
    )
    state.migrated = True
    fanout = None
    verifiers: list[TokenVerifier] = [AdminTokenVerifier(admin_token)]
    hub = None
    if settings.issuer:
        try:
            hub = HubTokenVerifier(
                settings.issuer, jwks_url=settings.jwks_url, audience=settings.audience
            )
        except ValueError as exc:
            await engine.dispose()
            raise RegistryStartError(str(exc)) from None
        verifiers.append(hub)
    authenticator = Authenticator(verifiers)
    # Watch streams end at once on stop (the notifier closes them); 5 s is for slow writers.
    tracer = settings.tracer_provider
    if tracer is None and settings.otlp_endpoint:
        tracer = settings.tracer_provider = tracer_provider(
            "cityplane-registry", settings.otlp_endpoint
        )
    runner = ProblemAppRunner(build_app(state, authenticator, tracer), shutdown_timeout=5.0)
    try:
        if hub is not None:
            await hub.start()  # one JWKS fetch now; without it hub tokens get a 503 for a while
        if is_postgresql(engine):
            fanout = PostgresFanout(engine, notifier.publish, store.revision)
            await fanout.start()
        await runner.setup()
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
    except BaseException:
        if fanout is not None:
            await fanout.stop()
        if hub is not None:
            await hub.close()
        await runner.cleanup()
        await engine.dispose()
        raise
    port = runner.addresses[0][1]
    reaper = asyncio.create_task(_reap(instances, settings.reap_interval), name="instance-reaper")
    return RunningRegistry(
        runner,
        state,
        host=settings.host,
        port=port,
        admin_token=admin_token,
        admin_token_file=token_file,
        fanout=fanout,
        reaper=reaper,
        hub=hub,
    )


async def serve(settings: RegistrySettings) -> None:
    """Run until SIGINT or SIGTERM."""
    running = await start_registry(settings)
    log.info(
        "registry listening on %s (revision %d); admin token in %s",
        running.url,
        running.state.notifier.revision,
        running.admin_token_file,
    )
    try:
        await until_stopped()
    finally:
        await running.stop()


def run(settings: RegistrySettings) -> None:
    """`cityplane registry`: blocks until SIGINT/SIGTERM. Raises RegistryStartError with a
    one-line message when the database or the token file is unusable, OSError when the port is
    taken."""
    asyncio.run(serve(settings))
