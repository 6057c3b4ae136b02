"""Build, start and run the identity hub: `start_identity(settings)` for `cityplane up` and
tests, `run(settings)` for `cityplane identity`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from cityplane.httperrors import ProblemAppRunner
from cityplane.problem import Problem
from cityplane.signals import until_stopped
from cityplane.storage import make_engine, migrate, ping, safe_url
from cityplane.telemetry import tracer_provider, tracing_middleware
from cityplane.tokenfile import AdminTokenError, load_or_create_admin_token
from identity import admin
from identity.audit import AuditLog
from identity.bruteforce import LocalThrottleStore, LoginThrottle, RedisThrottleStore
from identity.demo import seed_demo
from identity.federation import Upstream, UpstreamProvider
from identity.hub import HUB, Hub, IdentitySettings
from identity.key_encryption import (
    KeyEncryption,
    KeySecretError,
    load_or_create_key_secret,
)
from identity.keys import KeyRing, stored_keys_encrypted
from identity.oidc import endpoints
from identity.oidc.server import HubAuthorizationServer
from identity.sessions import RedisSessions
from identity.store import IdentityStore
from identity.trust.levels import TrustConfigError, TrustPolicy
from identity.trust.password import PasswordHasher
from identity.trust.realname import FileRealNameAuthority
from identity.trust.realperson import DevFaceMatcher
from identity.trust.sms import OutboxSender
from identity.web import account, enroll, federated, login, passkeys
from identity.web.session import ENV, template_environment

log = logging.getLogger(__name__)

_MIGRATION_LOCK = 0x49444E54  # "IDNT"
STATIC = Path(__file__).parent / "web" / "static"


class IdentityStartError(Exception):
    """The hub cannot start; the message is one line for the command line."""


class RunningIdentity:
    def __init__(
        self, runner: web.AppRunner, hub: Hub, port: int, tasks: list[asyncio.Task[Any]]
    ) -> None:
        self._runner = runner
        self.hub = hub
        self.port = port
        self.issuer = hub.issuer
        self._tasks = tasks
        self._stopped = False

    @property
    def admin_token(self) -> str:
        return self.hub.admin_token

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._runner.cleanup()
        await self.hub.audit.stop()
        if self.hub._http is not None:
            await self.hub._http.close()
        self.hub.hasher.close()
        await self.hub.engine.dispose()
        if self.hub.redis is not None:
            await self.hub.redis.aclose()
        provider = self.hub.settings.tracer_provider
        if provider is not None and self.hub.settings.otlp_endpoint:
            provider.shutdown()  # flushes the last spans (ours; a test's provider is its own)


@web.middleware
async def _problems(request: web.Request, handler: Any) -> web.StreamResponse:
    """Errors as problem+json (RFC 9457); pages render their own HTML errors."""
    try:
        return await handler(request)
    except Problem as problem:
        return web.Response(
            body=problem.body(request.path),
            status=problem.status,
            headers={**problem.headers, "Content-Type": "application/problem+json"},
        )
    except RedisError as exc:
        log.warning("session store unavailable: %s", exc)
        unavailable = Problem(
            503, "sessions-unavailable", "sign-in is unavailable for a moment; try again"
        )
        return web.Response(
            body=unavailable.body(request.path),
            status=503,
            headers={"Content-Type": "application/problem+json", "Retry-After": "5"},
        )
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        http_problem = Problem(exc.status, exc.reason.lower().replace(" ", "-"), exc.reason)
        return web.Response(
            body=http_problem.body(request.path),
            status=exc.status,
            headers={
                "Content-Type": "application/problem+json",
                **({"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}),
            },
        )


@web.middleware
async def _measured(request: web.Request, handler: Any) -> web.StreamResponse:
    started = time.perf_counter()
    try:
        return await handler(request)
    finally:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        request.app[HUB].metrics.requests.labels(name).observe(time.perf_counter() - started)


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    if not hub.ready or not await ping(hub.engine):
        return web.json_response({"status": "not ready"}, status=503)
    return web.json_response({"status": "ready"})


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[HUB].metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def build_app(hub: Hub) -> web.Application:
    middlewares: list[Any] = [_measured, _problems]
    provider = hub.settings.tracer_provider
    if provider is None and hub.settings.otlp_endpoint:
        provider = tracer_provider("cityplane-identity", hub.settings.otlp_endpoint)
        hub.settings.tracer_provider = provider
    if provider is not None:
        middlewares.insert(0, tracing_middleware(provider, "cityplane.identity"))
    app = web.Application(client_max_size=6 * 1024 * 1024, middlewares=middlewares)
    app[HUB] = hub
    app[ENV] = template_environment()
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_static("/static", STATIC, append_version=False)
    endpoints.add_routes(app)
    login.add_routes(app)
    passkeys.add_routes(app)
    federated.add_routes(app)
    enroll.add_routes(app)
    account.add_routes(app)
    admin.add_routes(app)
    return app


def _secret_file(path: Path, size: int = 32) -> bytes:
    """A per-installation secret kept in a 0600 file (the resident-ID fingerprint pepper)."""
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    value = secrets.token_bytes(size)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(value.hex() + "\n")
    return value


def _bind(host: str, port: int) -> socket.socket:
    """Bind first, so the issuer URL (which names the port) is known before anything serves."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _issuer(settings: IdentitySettings, port: int) -> str:
    if settings.issuer:
        issuer = settings.issuer.rstrip("/")
        parts = urlsplit(issuer)
        if (
            parts.scheme not in ("http", "https")
            or not parts.netloc
            or parts.query
            or parts.fragment
        ):
            raise IdentityStartError(
                f"issuer {settings.issuer!r} must be an http(s) URL without query"
            )
        return issuer
    host = settings.host if settings.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    return f"http://{host}:{port}"


async def start_identity(settings: IdentitySettings) -> RunningIdentity:
    """Migrate, seed keys, listen. Raises IdentityStartError (or OSError for the port)."""
    try:
        policy = (
            TrustPolicy.from_config(settings.trust_config)
            if settings.trust_config
            else TrustPolicy.default()
        )
    except TrustConfigError as exc:
        raise IdentityStartError(f"trust levels: {exc}") from None
    try:
        providers = [UpstreamProvider.model_validate(p) for p in settings.federation]
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise IdentityStartError(f"federation: {where}: {first['msg']}") from None
    state_dir = settings.data_dir / "identity"
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        admin_token = load_or_create_admin_token(settings.resolved_admin_token_file())
    except AdminTokenError as exc:
        raise IdentityStartError(str(exc)) from None
    url = settings.resolved_database_url()
    try:
        engine = make_engine(url)
    except (ArgumentError, ImportError) as exc:
        raise IdentityStartError(f"database URL {safe_url(url)}: {exc}") from None
    try:
        await migrate(engine, "identity:migrations", _MIGRATION_LOCK)
    except (OSError, SQLAlchemyError) as exc:
        await engine.dispose()
        raise IdentityStartError(
            f"cannot prepare the database {safe_url(url)}: {str(exc).splitlines()[0]}"
        ) from None

    runner: web.AppRunner | None = None
    try:
        redis = None
        if settings.redis_url:
            # Short timeouts and no retries of its own: a dead Redis must fail fast (the throttle
            # falls back to in-process counting; sessions answer 503).
            redis = Redis.from_url(
                settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5, retry=None
            )
        store = IdentityStore(engine, sessions=RedisSessions(redis) if redis else None)
        longest = max(settings.access_token_ttl, settings.id_token_ttl)
        try:
            keys = KeyRing(
                engine,
                alg=settings.signing_alg,
                token_lifetime=longest,
                publish_ahead=settings.key_publish_ahead,
                rotate_after=settings.key_rotate_after,
                encryption=await _key_encryption(settings, engine),
            )
            await keys.ensure()
        except KeySecretError as exc:
            raise IdentityStartError(str(exc)) from None
        audit = AuditLog(engine)
        throttle_store: Any = RedisThrottleStore(redis) if redis else LocalThrottleStore()
        sock = _bind(settings.host, settings.port)
        port = sock.getsockname()[1]
        issuer = _issuer(settings, port)
        face_key = ec.generate_private_key(ec.SECP256R1())
        face = DevFaceMatcher(face_key)
        realname_file = settings.realname_registry or state_dir / "realname-registry.yaml"
        hub = Hub(
            settings=settings,
            issuer=issuer,
            engine=engine,
            store=store,
            keys=keys,
            server=HubAuthorizationServer(
                issuer=issuer,
                keys=keys,
                access_token_ttl=settings.access_token_ttl,
                refresh_token_ttl=settings.refresh_token_ttl,
                code_ttl=settings.code_ttl,
                id_token_ttl=settings.id_token_ttl,
                userinfo=None,
                audiences=settings.audiences,
            ),
            audit=audit,
            policy=policy,
            hasher=PasswordHasher(),
            throttle=LoginThrottle(throttle_store),
            sms=OutboxSender(settings.sms_outbox or state_dir / "sms-outbox.jsonl"),
            realname=FileRealNameAuthority(realname_file),
            face=face,
            face_keys=face.public_jwks(),
            pepper=_secret_file(state_dir / "pepper"),
            admin_token=admin_token,
            secure_cookies=(
                settings.secure_cookies
                if settings.secure_cookies is not None
                else issuer.startswith("https://")
            ),
        )
        hub.server.userinfo = hub.userinfo
        hub.redis = redis
        hub.upstreams = {p.id: Upstream(p) for p in providers}
        audit.start()
        if settings.demo:
            await seed_demo(hub)
        runner = ProblemAppRunner(build_app(hub), shutdown_timeout=5.0)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        hub.ready = True
    except BaseException:
        if runner is not None:
            await runner.cleanup()
        await engine.dispose()
        raise
    tasks = [asyncio.create_task(_maintain_keys(keys), name="key-maintenance")]
    return RunningIdentity(runner, hub, port, tasks)


async def _key_encryption(settings: IdentitySettings, engine: AsyncEngine) -> KeyEncryption:
    """The key secret given, else the hub's own next to its SQLite database; without either
    (a database by URL and no secret) keys stay plain, as before ADR 20, with a warning."""
    secret = settings.key_secret
    own = settings.generated_key_secret_file()
    if own is not None:
        if not own.exists() and await stored_keys_encrypted(engine):
            raise KeySecretError(
                f"the signing keys are encrypted but their key secret file {own} is missing: "
                "restore it, or give that secret with --key-secret-file"
            )
        secret = load_or_create_key_secret(own)
    elif secret is None and settings.previous_key_secret is None:
        if await stored_keys_encrypted(engine):
            raise KeySecretError(
                "the signing keys are encrypted but no key secret is set: give the hub a key "
                "secret with --key-secret-file or CITYPLANE_KEY_SECRET"
            )
        log.warning(
            "signing keys are stored unencrypted in the database: give the hub a key secret "
            "(--key-secret-file or CITYPLANE_KEY_SECRET; "
            "docs/adr/0020-signing-keys-encrypted-at-rest.md)"
        )
    return KeyEncryption(secret, settings.previous_key_secret)


async def _maintain_keys(keys: KeyRing, interval: float = 60.0) -> None:
    """Pick up keys other replicas made and rotate when due."""
    while True:
        await asyncio.sleep(interval)
        try:
            await keys.ensure()
        except KeySecretError as exc:  # a new key sealed with a secret this replica lacks
            log.error("key maintenance: %s; trying again", exc)
        except Exception:  # a dead maintainer would stop rotation silently
            log.exception("key maintenance failed; trying again")


async def serve(settings: IdentitySettings) -> None:
    running = await start_identity(settings)
    log.info(
        "identity hub listening; issuer %s; admin token in %s",
        running.issuer,
        settings.resolved_admin_token_file(),
    )
    try:
        await until_stopped()
    finally:
        await running.stop()


def run(settings: IdentitySettings) -> None:
    asyncio.run(serve(settings))
