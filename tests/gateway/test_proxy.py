"""The gateway end to end: real gateway, real upstream servers, real sockets on loopback."""

from __future__ import annotations

import asyncio
import json
import re

from aiohttp import ClientSession

from tests.conftest import problem, service


def bus_route(**extra: object) -> dict:
    return {"name": "read", "match": {"pathPrefix": "/bus/"}, "stripPrefix": True, **extra}


async def raw_request(port: int, data: bytes, read: int = 65536) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(read), 5)
    finally:
        writer.close()


# Every test here runs on both request drivers (ADR 14): inline and on the connection's task.
GATEWAY_DRIVERS = ("inline", "task")


def status_of(raw: bytes) -> int:
    """Status code of a raw response (parse errors are answered as HTTP/1.0 by aiohttp)."""
    return int(raw.split(b" ", 2)[1])


async def test_routed_request_reaches_upstream_with_prefix_stripped(
    upstreams, gateway_factory, http
):

    up = await upstreams("bus")
    gw = await gateway_factory([service("bus-times", [up.url], [bus_route()])])
    async with http.get(gw.url + "/bus/stops/1?when=now") as resp:
        assert resp.status == 200
        seen = await resp.json()
    assert seen["path"] == "/stops/1"
    assert seen["query"] == "when=now"
    assert resp.headers["X-Upstream"] == "bus"
    assert len(resp.headers["X-Request-Id"]) == 32


async def test_unknown_path_gets_404_problem(upstreams, gateway_factory, http):
    up = await upstreams()
    gw = await gateway_factory([service("bus-times", [up.url], [bus_route()])])
    async with http.get(gw.url + "/trains/1") as resp:
        assert resp.status == 404
        assert resp.content_type == "application/problem+json"
        body = await resp.json(content_type=None)
    assert body["status"] == 404
    assert body["type"].endswith("/no-route")


async def test_wrong_method_gets_405_with_allow(upstreams, gateway_factory, http):
    up = await upstreams()
    route = {"name": "read", "match": {"pathPrefix": "/bus", "methods": ["GET"]}}
    gw = await gateway_factory([service("bus-times", [up.url], [route])])
    async with http.delete(gw.url + "/bus/1") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "GET"


async def test_dot_segments_cannot_escape_a_prefix_route(upstreams, gateway_factory):
    bus = await upstreams("bus")
    gw = await gateway_factory([service("bus-times", [bus.url], [bus_route()])])
    for target in ("/bus/../admin", "/bus/%2e%2e/admin", "/bus/.%2E/admin", "//bus/../admin"):
        raw = await raw_request(
            gw.gateway.port, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        assert status_of(raw) == 404, (target, raw[:80])
    for target in ("/bus/..%2Fadmin", "/bus/%5C..%5Cadmin", "/bus/..;/admin"):
        raw = await raw_request(
            gw.gateway.port, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        assert status_of(raw) == 400, (target, raw[:80])
    assert bus.requests == []


async def test_normalized_path_is_what_the_upstream_receives(upstreams, gateway_factory, http):
    up = await upstreams()
    route = {"name": "all", "match": {"pathPrefix": "/"}}
    gw = await gateway_factory([service("svc", [up.url], [route])])
    raw = await raw_request(
        gw.gateway.port, b"GET /a/b/../c//d/%2e/e HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status_of(raw) == 200
    assert up.requests[-1]["raw_path"] == "/a/c/d/e"


async def test_oversized_header_gets_431_and_long_line_414(upstreams, gateway_factory):
    up = await upstreams()
    gw = await gateway_factory([service("svc", [up.url], [bus_route()])])
    big = "a" * 20000
    raw = await raw_request(
        gw.gateway.port, f"GET /bus/ HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n".encode()
    )
    assert status_of(raw) == 431
    assert b"application/problem+json" in raw
    raw = await raw_request(gw.gateway.port, f"GET /bus/{big} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status_of(raw) == 414
    assert up.requests == []


async def test_body_over_the_limit_gets_413_without_reaching_upstream(
    upstreams, gateway_factory, http
):
    from gateway.connections import GatewayLimits

    up = await upstreams()
    gw = await gateway_factory(
        [service("svc", [up.url], [bus_route()])], limits=GatewayLimits(max_body=1000)
    )
    async with http.post(gw.url + "/bus/x", data=b"y" * 2000) as resp:
        assert resp.status == 413

    async def chunks():
        for _ in range(10):
            yield b"z" * 500

    async with http.post(gw.url + "/bus/x", data=chunks()) as resp:
        assert resp.status == 413
    assert up.requests == []


async def test_large_bodies_stream_both_ways(upstreams, gateway_factory, http):
    up = await upstreams()
    route = {"name": "all", "match": {"pathPrefix": "/"}}
    gw = await gateway_factory([service("svc", [up.url], [route])])
    async with http.get(gw.url + "/stream?size=20000000") as resp:
        assert resp.status == 200
        total = 0
        async for chunk in resp.content.iter_any():
            total += len(chunk)
    assert total == 20_000_000

    async def upload():
        for _ in range(100):
            yield b"u" * 100_000

    async with http.post(gw.url + "/upload", data=upload()) as resp:
        seen = await resp.json()
    assert seen["body_len"] == 10_000_000


async def test_hop_by_hop_and_spoofed_identity_headers_are_stripped(
    upstreams, gateway_factory, http
):
    up = await upstreams()
    gw = await gateway_factory([service("svc", [up.url], [bus_route()])])
    headers = {
        "Connection": "keep-alive, X-Secret",
        "X-Secret": "drop me",
        "Keep-Alive": "timeout=5",
        "X-CityPlane-Subject": "admin",
        "X-Forwarded-For": "6.6.6.6",
        "Forwarded": "for=6.6.6.6",
        "X-Custom": "kept",
    }
    async with http.get(gw.url + "/bus/x", headers=headers) as resp:
        seen = (await resp.json())["headers"]
    lower = {k.lower(): v for k, v in seen.items()}
    assert "x-secret" not in lower
    assert "keep-alive" not in lower
    assert "x-cityplane-subject" not in lower
    assert lower["x-forwarded-for"] == "127.0.0.1"
    assert lower["forwarded"].startswith("for=127.0.0.1;")
    assert lower["x-custom"] == "kept"
    assert lower["x-forwarded-proto"] == "http"
    assert lower["host"] == up.url.removeprefix("http://")


async def test_forwarded_for_is_appended_only_from_trusted_proxies(
    upstreams, gateway_factory, http
):
    up = await upstreams()
    gw = await gateway_factory(
        [service("svc", [up.url], [bus_route()])], trusted_proxies=["127.0.0.0/8"]
    )
    async with http.get(gw.url + "/bus/x", headers={"X-Forwarded-For": "203.0.113.9"}) as resp:
        seen = (await resp.json())["headers"]
    assert seen["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"


async def test_request_id_and_traceparent_are_propagated(upstreams, gateway_factory, http):
    up = await upstreams()
    gw = await gateway_factory([service("svc", [up.url], [bus_route()])])
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with http.get(
        gw.url + "/bus/x", headers={"X-Request-Id": "abc-123", "traceparent": trace}
    ) as resp:
        seen = (await resp.json())["headers"]
        assert resp.headers["X-Request-Id"] == "abc-123"
    lower = {k.lower(): v for k, v in seen.items()}
    assert lower["x-request-id"] == "abc-123"
    _version, trace_id, parent, _flags = lower["traceparent"].split("-")
    assert trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert parent != "00f067aa0ba902b7" and len(parent) == 16
    async with http.get(gw.url + "/bus/x", headers={"traceparent": "garbage"}) as resp:
        seen = (await resp.json())["headers"]
    assert len(seen["traceparent"].split("-")[1]) == 32


async def test_upstream_cookies_reach_the_client_and_no_jar_is_shared(upstreams, gateway_factory):
    up = await upstreams("cookie-setter")
    gw = await gateway_factory([service("svc", [up.url], [bus_route()])])
    async with ClientSession() as alice, ClientSession() as bob:
        async with alice.get(gw.url + "/bus/x") as resp:
            assert resp.cookies["upstream"].value == "cookie-setter"
        async with bob.get(gw.url + "/bus/x") as resp:
            await resp.read()
    assert "Cookie" not in up.requests[-1]["headers"]


async def test_retired_api_gets_410_and_deprecated_gets_headers(upstreams, gateway_factory, http):
    up = await upstreams()
    gw = await gateway_factory(
        [
            service(
                "old",
                [up.url],
                [{"name": "r", "match": {"pathPrefix": "/old"}}],
                lifecycle="retired",
            ),
            service(
                "aging",
                [up.url],
                [{"name": "r", "match": {"pathPrefix": "/aging"}}],
                lifecycle="deprecated",
                deprecatedSince="2026-01-01T00:00:00Z",
                sunset="2027-06-30T00:00:00Z",
            ),
            service(
                "draft",
                [up.url],
                [{"name": "r", "match": {"pathPrefix": "/draft"}}],
                lifecycle="draft",
            ),
        ]
    )
    async with http.get(gw.url + "/old/x") as resp:
        assert resp.status == 410
    async with http.get(gw.url + "/aging/x") as resp:
        assert resp.status == 200
        assert resp.headers["Deprecation"] == "@1767225600"
        assert resp.headers["Sunset"] == "Wed, 30 Jun 2027 00:00:00 GMT"
    async with http.get(gw.url + "/draft/x") as resp:
        assert resp.status == 404


async def test_round_robin_spreads_over_targets(upstreams, gateway_factory, http):
    a, b = await upstreams("a"), await upstreams("b")
    gw = await gateway_factory([service("svc", [a.url, b.url], [bus_route()])])
    for _ in range(10):
        async with http.get(gw.url + "/bus/x") as resp:
            await resp.read()
    assert len(a.requests) == 5 and len(b.requests) == 5


async def test_upstream_timeout_gets_504(upstreams, gateway_factory, http):
    up = await upstreams()
    up.delay = 2.0
    gw = await gateway_factory(
        [
            service(
                "slow",
                [up.url],
                [bus_route()],
                upstream={"timeouts": {"request": "300ms"}, "retries": {"attempts": 0}},
            )
        ]
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with http.get(gw.url + "/bus/x") as resp:
        assert resp.status == 504
        assert resp.content_type == "application/problem+json"
    assert loop.time() - started < 1.5


async def test_dead_target_is_retried_on_another_for_idempotent_requests(
    upstreams, gateway_factory, http
):
    alive = await upstreams("alive")
    dead = await upstreams("dead")
    await dead.stop()
    gw = await gateway_factory(
        [service("svc", [dead.url, alive.url], [bus_route()], upstream={"circuitBreaker": None})]
    )
    for _ in range(6):
        async with http.get(gw.url + "/bus/x") as resp:
            assert resp.status == 200
    # A POST is retried only when nothing was sent (connection refused counts as nothing sent).
    async with http.post(gw.url + "/bus/x", data=b"{}") as resp:
        assert resp.status == 200


async def test_5xx_is_retried_for_get_but_not_post(upstreams, gateway_factory, http):
    bad, good = await upstreams("bad"), await upstreams("good")
    bad.fail_with = 503
    gw = await gateway_factory(
        [service("svc", [bad.url, good.url], [bus_route()], upstream={"circuitBreaker": None})]
    )
    statuses = []
    for _ in range(4):
        async with http.get(gw.url + "/bus/x") as resp:
            statuses.append(resp.status)
    assert statuses == [200] * 4
    posts = []
    for _ in range(4):
        async with http.post(gw.url + "/bus/x", data=b"{}") as resp:
            posts.append(resp.status)
    assert 503 in posts


async def test_open_breaker_answers_503_without_touching_upstream(upstreams, gateway_factory, http):
    up = await upstreams()
    up.fail_with = 500
    gw = await gateway_factory(
        [
            service(
                "flaky",
                [up.url],
                [bus_route()],
                upstream={
                    "retries": {"attempts": 0},
                    "circuitBreaker": {"failureThreshold": 3, "resetTimeout": "500ms"},
                },
            )
        ]
    )
    for _ in range(3):
        async with http.get(gw.url + "/bus/x") as resp:
            assert resp.status == 500
    before = len(up.requests)
    async with http.get(gw.url + "/bus/x") as resp:
        assert resp.status == 503
        assert int(resp.headers["Retry-After"]) >= 1
        assert (await resp.json(content_type=None))["type"].endswith("/circuit-open")
    assert len(up.requests) == before
    # After resetTimeout one trial goes through; success closes the breaker.
    await asyncio.sleep(0.6)
    up.fail_with = None
    async with http.get(gw.url + "/bus/x") as resp:
        assert resp.status == 200
    async with http.get(gw.url + "/bus/x") as resp:
        assert resp.status == 200


async def test_client_errors_never_open_the_breaker(upstreams, gateway_factory, http):
    up = await upstreams()
    gw = await gateway_factory(
        [
            service(
                "svc",
                [up.url],
                [{"name": "all", "match": {"pathPrefix": "/"}}],
                upstream={"circuitBreaker": {"failureThreshold": 2, "resetTimeout": "10s"}},
            )
        ]
    )
    for code in (400, 401, 404, 429, 404, 401):
        async with http.get(gw.url + f"/status/{code}") as resp:
            assert resp.status == code
    async with http.get(gw.url + "/ok") as resp:
        assert resp.status == 200


async def test_unhealthy_target_is_ejected_and_recovers(upstreams, gateway_factory, http):
    a, b = await upstreams("a"), await upstreams("b")
    gw = await gateway_factory(
        [
            service(
                "svc",
                [a.url, b.url],
                [bus_route()],
                upstream={
                    "healthCheck": {
                        "path": "/healthz",
                        "interval": "50ms",
                        "healthyThreshold": 1,
                        "unhealthyThreshold": 1,
                    }
                },
            )
        ]
    )
    b.healthy = False
    await asyncio.sleep(0.3)
    a.requests.clear()
    b.requests.clear()
    for _ in range(6):
        async with http.get(gw.url + "/bus/x") as resp:
            assert resp.status == 200
    assert len(b.requests) == 0 and len(a.requests) == 6
    b.healthy = True
    await asyncio.sleep(0.3)
    for _ in range(6):
        async with http.get(gw.url + "/bus/x") as resp:
            await resp.read()
    assert len(b.requests) > 0


async def test_websocket_is_relayed(upstreams, gateway_factory, http):
    up = await upstreams("ws-up")
    gw = await gateway_factory(
        [service("svc", [up.url], [{"name": "all", "match": {"pathPrefix": "/"}}])]
    )
    async with http.ws_connect(gw.url + "/ws") as ws:
        await ws.send_str("hello")
        msg = await ws.receive(timeout=5)
        assert msg.data == "ws-up:hello"


async def test_expect_100_continue_is_answered_by_the_gateway(upstreams, gateway_factory):
    up = await upstreams()
    gw = await gateway_factory([service("svc", [up.url], [bus_route()])])
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.port)
    writer.write(
        b"POST /bus/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    line = await asyncio.wait_for(reader.readline(), 5)
    assert line.startswith(b"HTTP/1.1 100")
    await reader.readline()
    writer.write(b"hello")
    status = await asyncio.wait_for(reader.readline(), 5)
    assert status.startswith(b"HTTP/1.1 200")
    writer.close()


async def test_smuggling_conflicting_length_headers_are_rejected(upstreams, gateway_factory):
    up = await upstreams()
    gw = await gateway_factory([service("svc", [up.url], [bus_route()])])
    raw = await raw_request(
        gw.gateway.port,
        b"POST /bus/x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /bus/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert status_of(raw) == 400
    assert not any(r.get("path") == "/smuggled" for r in up.requests)


async def test_status_port_serves_health_readiness_and_metrics(upstreams, gateway_factory, http):
    up = await upstreams()
    gw = await gateway_factory([service("svc", [up.url], [bus_route()])])
    async with http.get(gw.url + "/bus/x") as resp:
        await resp.read()
    async with http.get(gw.status_url + "/healthz") as resp:
        assert resp.status == 200
    async with http.get(gw.status_url + "/readyz") as resp:
        assert resp.status == 200
    async with http.get(gw.status_url + "/metrics") as resp:
        text = await resp.text()
    assert 'cityplane_gateway_requests_total{route="read",service="svc",status="200"}' in text
    assert "cityplane_gateway_request_duration_seconds_bucket" in text
    # The status endpoints are not reachable through the proxy port.
    async with http.get(gw.url + "/metrics") as resp:
        assert resp.status == 404


async def test_bad_config_on_reload_keeps_serving_the_old_table(upstreams, gateway_factory, http):
    up = await upstreams()
    gw = await gateway_factory([service("svc", [up.url], [bus_route()])])
    gw.config.write_text("spec: [broken")
    assert await gw.gateway.reload() is False
    async with http.get(gw.url + "/bus/x") as resp:
        assert resp.status == 200
    gw.write([service("svc", [up.url], [{"name": "new", "match": {"pathPrefix": "/new"}}])])
    assert await gw.gateway.reload() is True
    async with http.get(gw.url + "/new/x") as resp:
        assert resp.status == 200
    async with http.get(gw.url + "/bus/x") as resp:
        assert resp.status == 404


async def test_file_change_is_picked_up_by_the_watcher(upstreams, gateway_factory, http):
    up = await upstreams()
    gw = await gateway_factory([service("svc", [up.url], [bus_route()])], watch_interval=0.05)
    gw.write([service("svc", [up.url], [{"name": "new", "match": {"pathPrefix": "/new"}}])])
    for _ in range(60):
        await asyncio.sleep(0.05)
        async with http.get(gw.url + "/new/x") as resp:
            if resp.status == 200:
                break
    assert resp.status == 200


async def test_problem_bodies_are_json(upstreams, gateway_factory, http):
    up = await upstreams()
    gw = await gateway_factory([service("svc", [up.url], [bus_route()])])
    async with http.get(gw.url + "/nothing") as resp:
        body = problem(await resp.read())
    assert set(body) >= {"type", "title", "status"}
    assert json.dumps(body)


async def test_rate_limited_route_sends_headers_and_429_with_retry_after(
    upstreams, gateway_factory, http
):
    from gateway import metrics

    up = await upstreams()
    route = bus_route(rateLimit={"requests": 3, "window": "10s", "key": "ip"})
    gw = await gateway_factory([service("svc", [up.url], [route])])
    rejected = metrics.RATELIMIT_REJECTED.labels(route="svc/read")
    before = rejected._value.get()  # the counter is process-wide: both drivers count
    remaining = []
    for _ in range(3):
        async with http.get(gw.url + "/bus/x") as resp:
            assert resp.status == 200
            assert resp.headers["RateLimit-Policy"] == '"default";q=3;w=10'
            remaining.append(resp.headers["RateLimit"])
    assert [r.split(";")[1] for r in remaining] == ["r=2", "r=1", "r=0"]
    async with http.get(gw.url + "/bus/x") as resp:
        assert resp.status == 429
        assert resp.content_type == "application/problem+json"
        # The sliding window may ask to wait past the window end (the previous one decays).
        assert 1 <= int(resp.headers["Retry-After"]) <= 20
        assert len(resp.headers.getall("RateLimit")) == 1
    assert len(up.requests) == 3
    async with http.get(gw.status_url + "/metrics") as resp:
        text = await resp.text()
    assert f'cityplane_gateway_ratelimit_rejected_total{{route="svc/read"}} {before + 1}' in text


async def test_retry_budget_can_forbid_retries(upstreams, gateway_factory, http):
    alive = await upstreams("alive")
    dead = await upstreams("dead")
    await dead.stop()
    retries = {"attempts": 2, "budgetPercent": 0, "minRetryConcurrency": 0}
    gw = await gateway_factory(
        [
            service(
                "svc",
                [dead.url, alive.url],
                [bus_route()],
                upstream={"circuitBreaker": None, "retries": retries},
            )
        ]
    )
    statuses = []
    for _ in range(4):
        async with http.get(gw.url + "/bus/x") as resp:
            statuses.append(resp.status)
    # Round-robin alternates: every request sent to the dead target fails without a retry.
    assert sorted(statuses) == [200, 200, 502, 502]


async def test_rejections_are_counted_by_route_and_reason(upstreams, gateway_factory, http):
    up = await upstreams()
    gw = await gateway_factory([service("svc", [up.url], [bus_route()])])
    line = 'cityplane_gateway_rejected_total{reason="no-route",route="-"} '

    async def counted() -> float:
        async with http.get(gw.status_url + "/metrics") as resp:
            text = await resp.text()
        found = [ln for ln in text.splitlines() if ln.startswith(line)]
        return float(found[0].removeprefix(line)) if found else 0.0

    before = await counted()
    async with http.get(gw.url + "/nowhere") as resp:
        assert resp.status == 404
    assert await counted() == before + 1


async def test_the_gateways_ratelimit_fields_replace_the_upstreams(gateway_factory, http):
    # The upstream sends its own RateLimit fields and an X-Request-Id: the client gets the
    # gateway's, once each (they describe the gateway's limit), and the upstream's other fields.
    from aiohttp import web

    async def answer(_: web.Request) -> web.Response:
        return web.Response(
            text="ok",
            headers={
                "RateLimit": '"upstream";r=99;t=5',
                "RateLimit-Policy": '"upstream";q=100;w=5',
                "X-Request-Id": "from-upstream",
                "X-Kept": "yes",
            },
        )

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        route = bus_route(rateLimit={"requests": 5, "window": "10s", "key": "ip"})
        gw = await gateway_factory([service("svc", [f"http://127.0.0.1:{port}"], [route])])
        for left in (4, 3):
            async with http.get(gw.url + "/bus/x", headers={"X-Request-Id": "r-1"}) as resp:
                assert resp.status == 200
                [state] = resp.headers.getall("RateLimit")  # t: what is left of the window
                assert re.fullmatch(f'"default";r={left};t=([1-9]|10)', state)
                assert resp.headers.getall("RateLimit-Policy") == ['"default";q=5;w=10']
                assert resp.headers.getall("X-Request-Id") == ["r-1"]
                assert resp.headers["X-Kept"] == "yes"
    finally:
        await runner.cleanup()


async def test_a_503_after_the_rate_limit_allowed_carries_its_fields(gateway_factory, http):
    # Nothing listens on the target: the breaker opens after one failure, and its 503 still
    # tells the client where it stands with the limit (the 502 before it does not).
    route = bus_route(rateLimit={"requests": 5, "window": "10s", "key": "ip"})
    upstream = {"circuitBreaker": {"failureThreshold": 1}, "retries": {"attempts": 0}}
    gw = await gateway_factory([service("svc", ["http://127.0.0.1:9"], [route], upstream=upstream)])
    async with http.get(gw.url + "/bus/x") as resp:
        assert resp.status == 502
    async with http.get(gw.url + "/bus/x") as resp:
        assert resp.status == 503
        assert resp.content_type == "application/problem+json"
        [state] = resp.headers.getall("RateLimit")
        assert re.fullmatch('"default";r=3;t=([1-9]|10)', state)
        assert resp.headers.getall("RateLimit-Policy") == ['"default";q=5;w=10']
