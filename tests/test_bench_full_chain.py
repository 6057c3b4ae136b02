"""`python -m bench`'s gateway-full configuration, without the benchmark: the issuer it makes up
is one the gateway believes, the route it configures lets its token through, and a run whose
requests were refused never counts as throughput.

Nothing heavy starts: an aiohttp server stands in for the upstream that serves the issuer's
documents (and, when nginx is installed, the real upstream nginx does, files and all).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from aiohttp import web

from bench.campaign import SATURATION, Measurement
from bench.configurations import BY_NAME, GATEWAY_FULL, NGINX, NGINX_LIMIT_REQ, Environment
from bench.gateway import MIN_TRUST_LEVEL, RATE_LIMIT, service_document
from bench.issuer import AUDIENCE, DISCOVERY, ISSUER_PATH, SCOPE, BenchIssuer, create_issuer
from bench.nginx import start_upstream
from bench.processes import CORE_LOAD, Supervisor, free_port
from bench.report import derive, summarize_phase
from bench.wrk import Load, WrkResult
from cityplane.schema import CityService
from gateway.exchange import Exchange
from gateway.h1server import detached_request
from gateway.jwks import TokenVerifier
from gateway.policies.auth import AuthPolicy


async def _verified_by_the_gateway(issuer: BenchIssuer) -> TokenVerifier:
    verifier = TokenVerifier(issuer.url, audience=issuer.audience)
    await verifier.start()
    assert verifier.keys.loaded, "the gateway could not load the bench issuer's keys"
    return verifier


@pytest.fixture
async def served_issuer() -> AsyncIterator[BenchIssuer]:
    """The issuer's documents over real HTTP, at the paths upstream.conf gives them."""
    port = free_port()
    issuer = create_issuer(f"http://127.0.0.1:{port}/{ISSUER_PATH}")
    app = web.Application()
    for path, document in issuer.documents().items():

        async def serve(_: web.Request, document: object = document) -> web.Response:
            return web.json_response(document)

        app.router.add_get(f"/{ISSUER_PATH}/{path}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield issuer
    finally:
        await runner.cleanup()


async def test_bench_token_is_accepted_by_the_gateways_verifier_at_trust_level_two(
    served_issuer: BenchIssuer,
) -> None:
    verifier = await _verified_by_the_gateway(served_issuer)
    try:
        verified = await verifier.verify(served_issuer.token)
    finally:
        await verifier.close()
    assert verified.level == 2
    assert verified.scopes == {SCOPE}
    assert verified.claims["aud"] == AUDIENCE
    assert verified.claims["exp"] - verified.claims["iat"] == 3600
    assert {"iss", "sub", "client_id", "jti"} <= verified.claims.keys()


async def test_full_chain_route_lets_the_bench_token_through_its_auth_policy(
    served_issuer: BenchIssuer,
) -> None:
    document = CityService.model_validate(
        service_document(9, rate_limit=True, auth_scope=served_issuer.scope)
    )
    route = document.spec.routes[0]
    assert route.auth is not None and route.rateLimit is not None
    assert route.auth.required and route.auth.minTrustLevel == MIN_TRUST_LEVEL == 2
    assert route.auth.scopes == [SCOPE]
    assert route.rateLimit.requests == RATE_LIMIT["requests"]
    assert document.spec.upstream.circuitBreaker is not None

    verifier = await _verified_by_the_gateway(served_issuer)
    policy = AuthPolicy("bench-upstream/all", route.auth, verifier)
    # What the configuration gives wrk to send (it reads only the environment's issuer).
    env = cast(Environment, SimpleNamespace(issuer=served_issuer))
    headers = BY_NAME[GATEWAY_FULL].request_headers(env)
    exchange = Exchange(
        detached_request("GET", "/", headers=headers),
        client_ip="127.0.0.1",
        path="/",
        route_id="bench-upstream/all",
        request_id="1",
        start=0.0,
    )
    try:
        await policy.check(exchange)  # a refusal would raise a Problem (401/403)
    finally:
        await verifier.close()
    assert exchange.consumer == "bench-client"
    assert b"X-CityPlane-Level: 2\r\n" in exchange.upstream_block


def test_wrk_sends_the_bearer_token_with_every_request() -> None:
    issuer = create_issuer("http://127.0.0.1:9/issuer")
    load = Load(64, 5, headers=(("Authorization", issuer.authorization),))
    argv = load.argv("http://127.0.0.1:8/", Path("summary.lua"))
    assert argv[argv.index("-H") + 1] == f"Authorization: Bearer {issuer.token}"
    assert argv[-1] == "http://127.0.0.1:8/"


@pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nginx", "taskset")), reason="needs nginx and taskset"
)
async def test_upstream_nginx_serves_the_issuer_to_the_gateway() -> None:
    # Run as root, nginx reads the files as nobody: they must be reachable in the work directory.
    with (
        tempfile.TemporaryDirectory(prefix="cityplane-bench-test-") as tmp,
        Supervisor(Path(tmp)) as supervisor,
    ):
        port = free_port()
        issuer = create_issuer(f"http://127.0.0.1:{port}/{ISSUER_PATH}")
        issuer.write(supervisor.workdir)
        assert (supervisor.workdir / ISSUER_PATH / DISCOVERY).is_file()
        start_upstream(supervisor, port, core=CORE_LOAD)
        verifier = await _verified_by_the_gateway(issuer)
        try:
            assert (await verifier.verify(issuer.token)).level == 2
        finally:
            await verifier.close()


def _run(configuration: str, round_: int, rps: float, non_2xx: int = 0) -> Measurement:
    wrk = WrkResult(
        requests=int(rps * 5),
        duration_s=5.0,
        rps=rps,
        p50_ms=1.0,
        p75_ms=1.0,
        p90_ms=1.0,
        p99_ms=2.0,
        p999_ms=3.0,
        mean_ms=1.0,
        max_ms=4.0,
        non_2xx=non_2xx,
        socket_errors=0,
    )
    return Measurement(
        configuration=configuration,
        phase=SATURATION,
        round=round_,
        wrk=wrk,
        connections=64,
        cpu_util=1.0,
        user_us=80.0,
        system_us=20.0,
        load_average=0.5,
        core_busy=[1.0, 0.9],
    )


def test_a_round_of_401s_never_counts_towards_the_full_chain_ratio() -> None:
    runs = [
        _run(NGINX, 1, 50_000),
        _run(NGINX_LIMIT_REQ, 1, 50_000),
        _run(GATEWAY_FULL, 1, 5_000),
        _run(NGINX, 2, 50_000),
        _run(NGINX_LIMIT_REQ, 2, 50_000),
        # Refused without reaching the upstream, a 401 is cheaper than a proxied 200.
        _run(GATEWAY_FULL, 2, 40_000, non_2xx=200_000),
    ]
    derived = derive(runs, {})
    assert derived["gateway_full_vs_nginx_limit_req"] == pytest.approx(0.1)
    summary = summarize_phase(runs, SATURATION)[GATEWAY_FULL]
    assert summary["ratio_to_nginx"] == pytest.approx(0.1)
    assert summary["non_2xx"] == 200_000
