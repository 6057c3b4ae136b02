"""`cityplane`: the one command line of the platform.

Bad input ends with one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from operators.cli import add_operator_parser, run_operator

EXIT_USAGE = 2
EXIT_CONFIG = 3


class CliError(Exception):
    """A user-facing failure: printed as one line, exit code attached."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _env(name: str, default: Any = None) -> Any:
    return os.environ.get(f"CITYPLANE_{name}", default)


def _float_env(name: str, default: float) -> float:
    return _number_env(name, default, float)


def _int_env(name: str, default: int | None) -> int | None:
    return _number_env(name, default, int)


def _number_env(name: str, default: Any, kind: Callable[[str], Any]) -> Any:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError:
        raise CliError(f"CITYPLANE_{name}={raw!r} is not a number", EXIT_USAGE) from None


def _add_server_args(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="listen address")
    p.add_argument("--port", type=int, default=_int_env("PORT", port), help="listen port")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cityplane",
        description="CityPlane: gateway, identity hub, registry and operators for a city.",
    )
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    up = sub.add_parser("up", help="run the whole platform on this machine with a demo city")
    _add_server_args(up, 8080)
    up.add_argument("--status-port", type=int, default=_int_env("STATUS_PORT", 8081))
    up.add_argument("--registry-port", type=int, default=_int_env("REGISTRY_PORT", 8090))
    up.add_argument("--identity-port", type=int, default=_int_env("IDENTITY_PORT", 8070))
    up.add_argument(
        "--data-dir", type=Path, default=Path(_env("DATA_DIR", ".cityplane")), help="state dir"
    )
    up.add_argument("--exit-after", type=float, default=None, help=argparse.SUPPRESS)

    gw = sub.add_parser("gateway", help="run the API gateway")
    _add_server_args(gw, 8080)
    gw.add_argument(
        "--config",
        type=Path,
        action="append",
        default=[Path(p) for p in (_env("GATEWAY_CONFIG") or "").split(os.pathsep) if p],
        help="CityService file or directory (repeatable)",
    )
    gw.add_argument("--registry", default=_env("REGISTRY_URL"), help="registry URL to follow")
    gw.add_argument(
        "--registry-token-file",
        type=Path,
        default=_env("REGISTRY_TOKEN_FILE"),
        help="file with the registry token (or CITYPLANE_REGISTRY_TOKEN)",
    )
    gw.add_argument(
        "--state-dir",
        type=Path,
        default=Path(_env("GATEWAY_STATE_DIR", ".cityplane/gateway")),
        help="where the last good registry snapshot is kept",
    )
    gw.add_argument("--status-port", type=int, default=_int_env("STATUS_PORT", 8081))
    gw.add_argument("--status-host", default=_env("STATUS_HOST"))
    gw.add_argument("--workers", type=int, default=_int_env("WORKERS", 1), help="0 = one per CPU")
    gw.add_argument("--redis", default=_env("REDIS_URL"), help="redis://… for shared state")
    gw.add_argument(
        "--redis-timeout",
        type=float,
        default=_float_env("REDIS_TIMEOUT", 0.25),
        help="seconds a rate-limit decision waits for Redis before onStoreError applies",
    )
    gw.add_argument(
        "--trusted-proxy",
        action="append",
        default=[c for c in (_env("TRUSTED_PROXIES") or "").split(",") if c],
        help="CIDR whose X-Forwarded-For is believed (repeatable)",
    )
    gw.add_argument("--access-log", default=_env("ACCESS_LOG", "stdout"), help="stdout|off|FILE")
    gw.add_argument("--otlp-endpoint", default=_env("OTLP_ENDPOINT"))
    gw.add_argument("--max-body", type=int, default=_int_env("MAX_BODY", 10 * 1024 * 1024))
    # Slow clients (docs/adr/0011-slow-clients.md); string defaults go through `type` too.
    gw.add_argument(
        "--header-timeout",
        type=float,
        metavar="SECONDS",
        default=_env("HEADER_TIMEOUT", "10"),
        help="first byte to end of a request head; 408 after (default 10)",
    )
    gw.add_argument(
        "--idle-timeout",
        type=float,
        metavar="SECONDS",
        default=_env("IDLE_TIMEOUT", "75"),
        help="close keep-alive connections idle this long (default 75)",
    )
    gw.add_argument(
        "--body-timeout",
        type=float,
        metavar="SECONDS",
        default=_env("BODY_TIMEOUT", "30"),
        help="longest gap between two reads of a request body; 408 after (default 30)",
    )
    gw.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        default=_env("MAX_CONNECTIONS"),
        help="client connections per worker; more are refused (default: half of ulimit -n, "
        "at most 10000)",
    )
    gw.add_argument("--watch-interval", type=float, default=1.0, help="0 disables file watching")
    gw.add_argument(
        "--issuer",
        metavar="URL",
        default=_env("ISSUER"),
        help="identity hub whose access tokens routes with 'auth' accept (JWKS by discovery)",
    )
    gw.add_argument(
        "--jwks-url", metavar="URL", default=_env("JWKS_URL"), help="JWKS URL (skips discovery)"
    )
    gw.add_argument(
        "--audience", metavar="AUD", default=_env("AUDIENCE"), help="required 'aud' of tokens"
    )

    reg = sub.add_parser("registry", help="run the registry (control plane)")
    _add_server_args(reg, 8090)
    reg.add_argument("--data-dir", type=Path, default=Path(_env("DATA_DIR", ".cityplane")))
    reg.add_argument(
        "--database-url",
        default=_env("DATABASE_URL"),
        help="postgresql+asyncpg://… (default: SQLite under --data-dir)",
    )
    reg.add_argument("--admin-token-file", type=Path, default=_env("ADMIN_TOKEN_FILE"))
    reg.add_argument("--heartbeat", type=float, default=15.0, help="watch heartbeat seconds")
    reg.add_argument("--otlp-endpoint", default=_env("OTLP_ENDPOINT"), help="traces (OTLP/HTTP)")
    reg.add_argument(
        "--issuer",
        metavar="URL",
        default=_env("ISSUER"),
        help="identity hub whose access tokens (registry:* scopes) are accepted too",
    )
    reg.add_argument(
        "--jwks-url", metavar="URL", default=_env("JWKS_URL"), help="JWKS URL (skips discovery)"
    )
    reg.add_argument(
        "--audience", metavar="AUD", default=_env("AUDIENCE"), help="required 'aud' of tokens"
    )

    idp = sub.add_parser("identity", help="run the OIDC identity hub")
    _add_server_args(idp, 8070)
    idp.add_argument(
        "--issuer", default=_env("ISSUER"), help="public URL (default: http://HOST:PORT)"
    )
    idp.add_argument("--data-dir", type=Path, default=Path(_env("DATA_DIR", ".cityplane")))
    idp.add_argument(
        "--database-url",
        default=_env("DATABASE_URL"),
        help="postgresql+asyncpg://… (default: SQLite under --data-dir)",
    )
    idp.add_argument("--redis-url", default=_env("REDIS_URL"), help="shared login throttling")
    idp.add_argument("--admin-token-file", type=Path, default=_env("ADMIN_TOKEN_FILE"))
    idp.add_argument(
        "--trust-config", type=Path, default=_env("TRUST_CONFIG"), help="YAML: trust levels"
    )
    idp.add_argument("--signing-alg", choices=("ES256", "RS256"), default="ES256")
    idp.add_argument(
        "--key-secret-file",
        type=Path,
        default=_env("KEY_SECRET_FILE"),
        help="secret that encrypts the signing keys at rest (or CITYPLANE_KEY_SECRET; "
        "default: generated next to the SQLite database, none with --database-url)",
    )
    idp.add_argument(
        "--previous-key-secret-file",
        type=Path,
        default=_env("PREVIOUS_KEY_SECRET_FILE"),
        help="the key secret before a rotation: keys it opens are re-encrypted "
        "(or CITYPLANE_PREVIOUS_KEY_SECRET)",
    )
    idp.add_argument(
        "--realname-registry",
        type=Path,
        default=_env("REALNAME_REGISTRY"),
        help="reference real-name authority file (development)",
    )
    idp.add_argument("--sms-outbox", type=Path, default=_env("SMS_OUTBOX"))
    idp.add_argument(
        "--federation",
        type=Path,
        default=_env("FEDERATION"),
        help="YAML: upstream OIDC providers as sign-in methods ({providers: [...]})",
    )
    idp.add_argument("--demo", action="store_true", help="create the demo accounts and clients")
    idp.add_argument(
        "--audience",
        action="append",
        default=[a for a in (_env("AUDIENCE") or "").split(",") if a],
        metavar="AUD",
        help="access tokens' aud: a resource server's identifier (repeatable; default: the client)",
    )
    idp.add_argument("--otlp-endpoint", default=_env("OTLP_ENDPOINT"), help="traces (OTLP/HTTP)")
    add_operator_parser(sub)
    sub.add_parser("version", help="print the version")
    _add_registry_commands(sub)
    return parser


def _add_registry_args(p: argparse.ArgumentParser) -> None:
    """Where the registry is: flags, else the context file, else CITYPLANE_REGISTRY_*."""
    p.add_argument("--registry", metavar="URL", help="registry URL (default: current context)")
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token", help="bearer token (visible in `ps`: prefer --token-file)")
    token.add_argument("--token-file", type=Path, metavar="PATH", help="file holding the token")
    p.add_argument("--context", metavar="NAME", help="context of the context file to use")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per registry request")


def _add_registry_commands(sub: Any) -> None:
    files = {"action": "append", "type": Path, "metavar": "FILE|DIR", "dest": "filename"}

    p = sub.add_parser("apply", help="create or update services in the registry from files")
    p.add_argument(
        "-f", "--filename", required=True, help="file or directory (repeatable)", **files
    )
    p.add_argument("--dry-run", action="store_true", help="show what would change, write nothing")
    _add_registry_args(p)

    p = sub.add_parser("delete", help="delete services: -f FILE|DIR or 'service NAME …'")
    p.add_argument("resource", nargs="?", metavar="service", help="'service' (with NAMEs)")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("-f", "--filename", default=[], help="file or directory (repeatable)", **files)
    p.add_argument("--ignore-not-found", action="store_true", help="absent services are fine")
    _add_registry_args(p)

    p = sub.add_parser("get", help="show services: 'get services' or 'get service NAME'")
    p.add_argument("resource", choices=("services", "service", "svc"))
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("-o", "--output", choices=("table", "yaml", "json"))
    p.add_argument("--lifecycle", choices=("draft", "published", "deprecated", "retired"))
    p.add_argument(
        "-l", "--selector", action="append", default=[], metavar="KEY=VALUE", help="label filter"
    )
    _add_registry_args(p)

    p = sub.add_parser("lifecycle", help="move a service along its lifecycle")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--to", required=True, choices=("draft", "published", "deprecated", "retired"))
    p.add_argument("--sunset", metavar="DATE", help="with --to deprecated: 2027-06-30 or a time")
    _add_registry_args(p)

    p = sub.add_parser("import-openapi", help="turn an OpenAPI 3 document into a CityService")
    p.add_argument("spec", type=Path, metavar="SPEC.yaml")
    p.add_argument("--name", required=True, help="service name")
    p.add_argument("--upstream", required=True, metavar="URL", help="target URL of the service")
    p.add_argument("--prefix", help="public path prefix (default: the path of servers[0].url)")
    p.add_argument("--lifecycle", choices=("draft", "published", "deprecated", "retired"))
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")

    p = sub.add_parser("login", help="remember a registry and its token as the current context")
    p.add_argument("--registry", required=True, metavar="URL")
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token-file", type=Path, metavar="PATH")
    token.add_argument("--token", help=argparse.SUPPRESS)
    p.add_argument("--context", default="default", metavar="NAME")


def _gateway_settings(args: argparse.Namespace) -> Any:
    from gateway.connections import GatewayLimits
    from gateway.runtime import GatewaySettings

    token = os.environ.get("CITYPLANE_REGISTRY_TOKEN")
    if args.registry:
        if args.config:
            raise CliError("give either --config or --registry, not both", EXIT_USAGE)
        if args.registry_token_file is not None:
            try:
                token = Path(args.registry_token_file).read_text().strip()
            except OSError as exc:
                raise CliError(
                    f"--registry-token-file {args.registry_token_file}: {exc.strerror}", EXIT_CONFIG
                ) from None
    elif not args.config:
        raise CliError(
            "give --config FILE|DIR (or CITYPLANE_GATEWAY_CONFIG) or --registry URL", EXIT_USAGE
        )
    for p in args.config:
        if not p.exists():
            raise CliError(f"--config {p}: no such file or directory", EXIT_CONFIG)
    if args.status_port == args.port:
        raise CliError("--status-port must differ from --port", EXIT_USAGE)
    if not 0 < args.redis_timeout <= 60:
        raise CliError(
            f"--redis-timeout {args.redis_timeout:g}: give seconds above 0, at most 60", EXIT_USAGE
        )
    if args.jwks_url and not args.issuer:
        raise CliError(
            "--jwks-url needs --issuer too: a token's 'iss' must match it (RFC 9068 §4)",
            EXIT_USAGE,
        )
    for flag, url in (("--issuer", args.issuer), ("--jwks-url", args.jwks_url)):
        if url and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname):
            raise CliError(f"{flag} {url!r} is not an http(s) URL with a host", EXIT_USAGE)
    try:
        limits = GatewayLimits(
            max_body=args.max_body,
            header_timeout=args.header_timeout,
            idle_timeout=args.idle_timeout,
            body_timeout=args.body_timeout,
            max_connections=args.max_connections,
        )
    except ValueError as exc:
        raise CliError("--" + str(exc).replace("_", "-", 1), EXIT_USAGE) from None
    return GatewaySettings(
        config=list(args.config),
        host=args.host,
        port=args.port,
        status_host=args.status_host,
        status_port=args.status_port,
        redis_url=args.redis,
        redis_timeout=args.redis_timeout,
        trusted_proxies=list(args.trusted_proxy),
        access_log=args.access_log,
        otlp_endpoint=args.otlp_endpoint,
        issuer=args.issuer,
        jwks_url=args.jwks_url,
        audience=args.audience,
        watch_interval=args.watch_interval,
        limits=limits,
        registry_url=args.registry,
        registry_token=token,
        state_dir=args.state_dir,
    )


def _check_config(settings: Any) -> None:
    """Validate config files before binding anything, so errors are one line and exit 3."""
    if settings.registry_url:
        return  # the registry validated every document it accepted
    from cityplane.documents import DocumentError, load_documents
    from gateway.compiler import Compiler, ConfigError, PolicyContext
    from gateway.policies.ratelimit_store import LocalStore

    # Routes with auth compile against a verifier that is never started: no key is fetched here.
    # Imported only then: PyJWT brings cryptography, ~10 MB of RSS a gateway without an issuer
    # never uses (the single worker runs in this process).
    verifier = None
    if settings.issuer:
        from gateway.jwks import TokenVerifier

        verifier = TokenVerifier(
            settings.issuer, jwks_url=settings.jwks_url, audience=settings.audience
        )
    try:
        services = load_documents(settings.config)
        local = LocalStore()
        Compiler(PolicyContext(local, local, token_verifier=verifier)).compile(services)
    except (DocumentError, ConfigError) as exc:
        raise CliError(f"invalid config: {exc}", EXIT_CONFIG) from None


def _run_gateway(args: argparse.Namespace) -> int:
    workers = args.workers if args.workers > 0 else (os.cpu_count() or 1)
    if workers > 1:
        # Multi-process metrics must be chosen before any metric is created.
        from gateway.workers import prepare_multiprocess_metrics

        prepare_multiprocess_metrics()
        from gateway.workers import run_workers

        settings = _gateway_settings(args)
        _check_config(settings)
        return run_workers(settings, workers)
    settings = _gateway_settings(args)
    _check_config(settings)
    from gateway.runtime import serve

    _use_uvloop()
    try:
        asyncio.run(serve(settings))
    except OSError as exc:
        raise CliError(f"cannot listen: {exc.strerror or exc}", 1) from None
    return 0


def _run_registry(args: argparse.Namespace) -> int:
    from registry.app import RegistrySettings, RegistryStartError, run

    _use_uvloop()
    settings = RegistrySettings(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        database_url=args.database_url,
        admin_token_file=args.admin_token_file,
        heartbeat=args.heartbeat,
        otlp_endpoint=args.otlp_endpoint,
        issuer=args.issuer,
        jwks_url=args.jwks_url,
        audience=args.audience,
    )
    if args.jwks_url and not args.issuer:
        raise CliError(
            "--jwks-url needs --issuer too: a token's 'iss' must match it (RFC 9068 §4)",
            EXIT_USAGE,
        )
    try:
        run(settings)
    except RegistryStartError as exc:
        raise CliError(str(exc), EXIT_CONFIG) from None
    except OSError as exc:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    return 0


def _run_identity(args: argparse.Namespace) -> int:
    from cityplane.documents import DocumentError, load_yaml_mapping
    from identity.app import IdentityStartError, run
    from identity.hub import IdentitySettings
    from identity.key_encryption import KeySecretError, configured_key_secret

    trust: dict[str, Any] | None = None
    federation: list[dict[str, Any]] = []
    try:
        if args.trust_config is not None:
            trust = load_yaml_mapping(args.trust_config)
        if args.federation is not None:
            providers = load_yaml_mapping(args.federation).get("providers")
            if not isinstance(providers, list):
                raise CliError(f"{args.federation}: 'providers' must be a list", EXIT_CONFIG)
            federation = providers
        # The secrets' values come from files or the environment, never flags (`ps` shows those).
        key_secret = configured_key_secret(
            args.key_secret_file,
            _env("KEY_SECRET"),
            flag="--key-secret-file",
            env="CITYPLANE_KEY_SECRET",
        )
        previous_key_secret = configured_key_secret(
            args.previous_key_secret_file,
            _env("PREVIOUS_KEY_SECRET"),
            flag="--previous-key-secret-file",
            env="CITYPLANE_PREVIOUS_KEY_SECRET",
        )
    except (DocumentError, KeySecretError) as exc:
        raise CliError(str(exc), EXIT_CONFIG) from None
    _use_uvloop()
    settings = IdentitySettings(
        host=args.host,
        port=args.port,
        issuer=args.issuer,
        data_dir=args.data_dir,
        database_url=args.database_url,
        redis_url=args.redis_url,
        admin_token_file=args.admin_token_file,
        trust_config=trust,
        signing_alg=args.signing_alg,
        key_secret=key_secret,
        previous_key_secret=previous_key_secret,
        realname_registry=args.realname_registry,
        sms_outbox=args.sms_outbox,
        federation=federation,
        demo=args.demo,
        otlp_endpoint=args.otlp_endpoint,
        audiences=args.audience,
    )
    try:
        run(settings)
    except IdentityStartError as exc:
        raise CliError(str(exc), EXIT_CONFIG) from None
    except OSError as exc:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    return 0


CLIENT_COMMANDS = ("apply", "delete", "get", "lifecycle", "import-openapi", "login")


def _run_client_command(args: argparse.Namespace) -> int:
    """The registry client commands; their modules raise CommandError for one-line failures."""
    from cityplane.commands import CommandError

    try:
        if args.command == "import-openapi":
            from cityplane import openapi_import

            return openapi_import.run(args)
        if args.command == "login":
            from cityplane.context import login

            return login(args)
        from cityplane.commands import run

        return run(args)
    except CommandError as exc:
        raise CliError(str(exc), exc.code) from None


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()  # defaults come from CITYPLANE_* variables: they may be bad
    except CliError as exc:
        print(f"cityplane: {exc}", file=sys.stderr)
        return exc.code
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=str(args.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if logging.getLogger().level > logging.DEBUG:
        # Alembic narrates every plugin and migration step at INFO; the parts log what matters.
        logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        if args.command == "gateway":
            return _run_gateway(args)
        if args.command == "up":
            from cityplane.demo import run_demo

            _use_uvloop()
            return run_demo(args)
        if args.command == "version":
            from importlib.metadata import version

            print(f"cityplane {version('cityplane')}")
            return 0
        if args.command in CLIENT_COMMANDS:
            return _run_client_command(args)
        if args.command == "registry":
            return _run_registry(args)
        if args.command == "operator":
            return run_operator(args)
        if args.command == "identity":
            return _run_identity(args)
        parser.print_help()
        return EXIT_USAGE
    except CliError as exc:
        print(f"cityplane: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: exceptions raised elsewhere
    # (cityplane.cli.CliError) must be the class this main catches.
    from cityplane.cli import main as _main

    raise SystemExit(_main())
