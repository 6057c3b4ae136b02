"""A running gateway: config source, compiled table, proxy listener and status listener.

Reloads (SIGHUP, a changed file) compile a new table off to the side and swap one reference;
requests already in flight finish on the table they started with. A config that does not
compile is rejected as a whole and the previous table keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from aiohttp import web

from cityplane.documents import DocumentError
from gateway import metrics
from gateway.accesslog import AccessLog
from gateway.compiler import Compiler, ConfigError, PolicyContext
from gateway.connections import GatewayLimits, make_server
from gateway.forwarding import TrustedProxies
from gateway.heap import FrozenHeap
from gateway.policies.ratelimit_redis import RedisStore
from gateway.policies.ratelimit_store import LocalStore
from gateway.registry_source import RegistrySource
from gateway.routing import RoutingTable
from gateway.server import RequestPath
from gateway.sources import ConfigSource, FileSource
from gateway.speedups import status as modules_status
from gateway.status import status_app
from gateway.tracing import Tracing
from gateway.upstream.breaker import SharedBreakerState
from gateway.upstream.cluster import UpstreamCluster

if TYPE_CHECKING:
    from gateway.jwks import TokenVerifier

log = logging.getLogger("cityplane.gateway")


@dataclass
class GatewaySettings:
    config: list[Path] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8080
    status_host: str | None = None  # defaults to `host`
    status_port: int | None = 8081  # None: no status listener (a worker under a supervisor)
    redis_url: str | None = None
    redis_timeout: float = 0.25  # a rate-limit decision's wait for Redis (then onStoreError)
    registry_url: str | None = None  # follow a registry instead of files
    registry_token: str | None = None
    state_dir: Path = field(default_factory=lambda: Path(".cityplane/gateway"))
    trusted_proxies: list[str] = field(default_factory=list)
    access_log: str = "stdout"  # "stdout" | "off" | a file path
    otlp_endpoint: str | None = None
    # Access tokens (routes with `auth`): the identity hub's issuer URL; its JWKS is found by
    # OpenID Connect Discovery unless jwks_url is given; audience is the expected `aud`.
    issuer: str | None = None
    jwks_url: str | None = None
    audience: str | None = None
    watch_interval: float = 1.0  # seconds between config file checks; 0 disables
    drain_timeout: float = 30.0
    reuse_port: bool = False
    limits: GatewayLimits = field(default_factory=GatewayLimits)


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.ready = False
        self.draining = False
        self.revision = 0
        self._reload_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[Any]] = []
        self._rl_store: RedisStore | None = None
        self._shared: SharedBreakerState | None = None
        self.verifier: TokenVerifier | None = None
        self._listener: asyncio.base_events.Server | None = None
        self._server: Any = None
        self._status: web.AppRunner | None = None
        self._access_sink: IO[str] | None = None
        self.access_log: AccessLog | None = None
        self.path: RequestPath | None = None
        # Refrozen after a reload once retired clusters are closed (_retire waits at most
        # drain_timeout + 1 s).
        self.heap = FrozenHeap(settle=settings.drain_timeout + 2.0)
        self.port: int = settings.port
        self.status_port: int | None = settings.status_port
        self.source: ConfigSource
        if settings.registry_url:
            self.source = RegistrySource(
                settings.registry_url,
                token=settings.registry_token,
                state_dir=settings.state_dir,
            )
        else:
            self.source = FileSource(settings.config, interval=settings.watch_interval)

    # -- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        local = LocalStore()
        store: Any = local
        if s.redis_url:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # No retries and a short deadline (--redis-timeout): Redis sits on the request path
            # of rate-limited routes; the default 0.25 s leaves room for event-loop lag under
            # full load (0.1 s tripped).
            self._rl_store = RedisStore.from_url(s.redis_url, timeout=s.redis_timeout)
            await self._rl_store.start()
            store = self._rl_store
            # Off the request path, but no retries either: a dead Redis is noticed at once.
            self._shared = SharedBreakerState(
                aioredis.from_url(
                    s.redis_url, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
                )
            )
            await self._shared.start()
        if s.issuer:
            # PyJWT and cryptography (~20 MB of RSS per worker, issue #6) only when tokens
            # are checked; likewise redis above only with a Redis URL.
            from gateway.jwks import TokenVerifier

            self.verifier = TokenVerifier(s.issuer, jwks_url=s.jwks_url, audience=s.audience)
        elif s.jwks_url:
            raise ConfigError("a JWKS URL needs the issuer too (tokens' iss is checked)")
        self.compiler = Compiler(
            PolicyContext(store, local, self._shared, token_verifier=self.verifier)
        )
        services = await self.source.load()
        self.revision = self.source.revision or 1
        result = self.compiler.compile(services, revision=self.revision)
        metrics.CONFIG_REVISION.set(self.revision)
        if self.verifier is not None:
            # Keys are fetched now; if the hub is down the gateway starts anyway (routes with
            # auth answer 503 token-keys-unavailable) and keeps trying in the background.
            await self.verifier.start()
        for cluster in result.started:
            await cluster.start()
        metrics.CONFIG_ROUTES.set(len(result.table))
        metrics.CONFIG_RELOADS.labels("ok").inc()
        metrics.install()  # the per-request counters (lock-free; gateway/metrics.py)
        await metrics.REQUEST_METRICS.start()
        if s.access_log != "off":
            if s.access_log == "stdout":
                self._access_sink = sys.stdout
            else:
                self._access_sink = await asyncio.get_running_loop().run_in_executor(
                    None,
                    lambda: open(s.access_log, "a", encoding="utf-8"),  # noqa: SIM115
                )
            self.access_log = AccessLog(self._access_sink)
            await self.access_log.start()
        self.tracing = Tracing(s.otlp_endpoint)
        self.path = RequestPath(
            table=result.table,
            trusted=TrustedProxies(s.trusted_proxies),
            limits=s.limits,
            access_log=self.access_log,
            tracing=self.tracing,
        )
        self._server = make_server(self.path, s.limits)
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            self._server, s.host, s.port, reuse_port=s.reuse_port or None, backlog=2048
        )
        sock = self._listener.sockets[0]
        self.port = sock.getsockname()[1]
        if s.status_port is not None:
            self._status = web.AppRunner(status_app(self), access_log=None)
            await self._status.setup()
            site = web.TCPSite(self._status, s.status_host or s.host, s.status_port)
            await site.start()
            sockets = getattr(site._server, "sockets", None)
            if sockets:
                self.status_port = sockets[0].getsockname()[1]
        if s.registry_url or (s.watch_interval > 0 and s.config):
            self._tasks.append(asyncio.create_task(self._watch(), name="config-watch"))
        # Following a registry, the gateway is ready once it holds a snapshot (live or saved).
        self.ready = self.source.ready
        self.heap.freeze()  # everything so far lives as long as the process (gateway/heap.py)
        log.info(
            "gateway listening on %s:%d (status %s), %d routes; modules: %s",
            s.host,
            self.port,
            self.status_port,
            len(result.table),
            modules_status(),  # compiled (ADR 15) or the Python sources, and why
        )

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to drain_timeout), close."""
        self.ready = False
        self.draining = True
        if self._server is not None:
            self._server.draining = True  # answers from now on say "Connection: close"
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.heap.close()
        await self.source.close()
        if self._listener is not None:
            self._listener.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout
        # Polling a counter at shutdown only, so the request path pays nothing for it.
        while self.path is not None and self.path.in_flight and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if self._server is not None:
            await self._server.shutdown(1.0)
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._listener.wait_closed(), 1.0)
        for cluster in self.compiler.all_clusters():
            await cluster.close()
        if self.path is not None:
            await self.path.close()
        if self.access_log is not None:
            await self.access_log.close()
        if self._access_sink is not None and self._access_sink is not sys.stdout:
            self._access_sink.close()
        await metrics.REQUEST_METRICS.close()  # under --workers: the last values to the files
        if self._status is not None:
            await self._status.cleanup()
        if self._shared is not None:
            await self._shared.close()
        if self.verifier is not None:
            await self.verifier.close()
        if self._rl_store is not None:
            await self._rl_store.close()
        self.tracing.shutdown()

    # -- config ----------------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Load and compile the config; swap it in, or keep the old table and say why."""
        async with self._reload_lock:
            try:
                services = await self.source.load()
                revision = self.source.revision or self.revision + 1
                result = self.compiler.compile(services, revision=revision)
            except (DocumentError, ConfigError) as exc:
                metrics.CONFIG_RELOADS.labels("error").inc()
                log.error("config rejected, still serving revision %d: %s", self.revision, exc)
                return False
            for cluster in result.started:
                await cluster.start()
            assert self.path is not None
            self.path.table = result.table  # the atomic swap
            self.heap.reloaded()
            self.revision = revision
            metrics.CONFIG_REVISION.set(revision)
            if self.source.ready and not self.draining:
                self.ready = True
            metrics.CONFIG_ROUTES.set(len(result.table))
            metrics.CONFIG_RELOADS.labels("ok").inc()
            if result.retired:
                self._tasks.append(asyncio.create_task(self._retire(result.retired)))
            log.info("config revision %d: %d routes", self.revision, len(result.table))
            return True

    async def _retire(self, clusters: list[UpstreamCluster]) -> None:
        # Requests that picked a retired cluster finish on it; close once they are surely done.
        timeout = max((c.request_timeout for c in clusters), default=10.0)
        await asyncio.sleep(min(timeout, self.settings.drain_timeout) + 1)
        for cluster in clusters:
            await cluster.close()

    async def _watch(self) -> None:
        while True:
            await self.source.changed()
            await self.reload()

    @property
    def table(self) -> RoutingTable | None:
        return self.path.table if self.path is not None else None


async def serve(settings: GatewaySettings, *, on_ready: Any = None) -> None:
    """Run a gateway until SIGINT/SIGTERM; SIGHUP reloads the config."""
    gateway = Gateway(settings)
    await gateway.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(gateway.reload()))
    if on_ready is not None:
        on_ready(gateway)
    try:
        await stop.wait()
    finally:
        await gateway.stop()


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def worker_count(requested: int) -> int:
    return max(1, requested if requested > 0 else (os.cpu_count() or 1))
