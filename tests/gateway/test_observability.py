"""Traces and access log, as an operator reads them."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from yarl import URL

from gateway.accesslog import AccessLog
from gateway.tracing import Tracing, continue_trace, random_hex
from tests.conftest import service

ROUTE = [{"name": "r", "match": {"pathPrefix": "/"}}]


async def test_spans_are_exported_with_the_clients_trace(upstreams, gateway_factory, http):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    up = await upstreams()
    gw = await gateway_factory([service("svc", [up.url], ROUTE)])
    gw.gateway.path.tracing = Tracing(provider=provider)
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with http.get(gw.url + "/x", headers={"traceparent": trace}) as resp:
        assert resp.status == 200
    spans = {s.kind.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"SERVER", "CLIENT"}
    server, client = spans["SERVER"], spans["CLIENT"]
    assert f"{server.context.trace_id:032x}" == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert client.parent.span_id == server.context.span_id
    sent = up.requests[-1]["headers"]["traceparent"]
    assert sent.split("-")[2] == f"{client.context.span_id:016x}"
    assert server.attributes["http.response.status_code"] == 200


def test_trace_context_is_continued_or_started() -> None:
    trace_id, header = continue_trace("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    assert trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert header.endswith("-01") and "00f067aa0ba902b7" not in header
    for bad in (None, "", "zz", "00-" + "0" * 32 + "-00f067aa0ba902b7-01"):
        trace_id, header = continue_trace(bad)
        assert len(trace_id) == 32 and trace_id != "0" * 32


def test_random_ids_are_hex_of_the_asked_length_and_never_repeat_across_a_pool_refill() -> None:
    ids = [random_hex(32) for _ in range(500)] + [random_hex(16) for _ in range(500)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids[:500])
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids[500:])
    assert len(set(ids)) == len(ids)  # 1,000 ids span ~12 pools of random digits


def test_a_forked_worker_does_not_hand_out_its_parents_next_ids() -> None:
    random_hex(32)  # the parent's pool is filled: without a reset, a child would share it
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first id, then out without running the parent's cleanup
        os.write(write, random_hex(32).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 32 and child != random_hex(32)


async def test_access_log_lines_are_json_and_written_in_batches(upstreams, gateway_factory, http):
    up = await upstreams()
    gw = await gateway_factory([service("svc", [up.url], ROUTE)])
    sink = io.StringIO()
    log = AccessLog(sink, flush_interval=0.05)
    await log.start()
    gw.gateway.path.access_log = log
    for _ in range(3):
        async with http.get(gw.url + "/x?q=1", headers={"X-Request-Id": "req-1"}) as resp:
            await resp.read()
    async with http.get(URL(gw.url + "/a/%2Fb", encoded=True)) as resp:
        assert resp.status == 400
    await asyncio.sleep(0.15)
    await log.close()
    lines = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert len(lines) == 4
    first = lines[0]
    assert first["status"] == 200 and first["service"] == "svc" and first["route"] == "r"
    assert first["request_id"] == "req-1" and first["path"] == "/x?q=1"
    assert first["upstream"] == up.url
    assert lines[-1]["status"] == 400 and lines[-1]["service"] == "-"


async def test_access_log_drops_lines_instead_of_blocking_when_full() -> None:
    sink = io.StringIO()
    log = AccessLog(sink, max_lines=2)
    for i in range(20):
        log.record({"i": i})
    assert log.dropped == 12
    log.flush()
    assert len(sink.getvalue().splitlines()) == 8


async def test_durations_have_microsecond_resolution_on_the_gateways_own_loop(
    upstreams, http, tmp_path
):
    # `cityplane gateway` runs on uvloop, whose loop.time() ticks in whole milliseconds: timed
    # with it, a sub-millisecond request logged 0.000 or 1.000 ms. The process is the real one.
    import yaml

    from tests.gateway.procs import GatewayProcess

    up = await upstreams()
    config = tmp_path / "services.yaml"
    config.write_text(yaml.safe_dump_all([service("svc", [up.url], ROUTE)]))
    log_file = tmp_path / "access.log"
    gw = GatewayProcess(config, "--access-log", str(log_file))
    try:
        await gw.ready()
        for _ in range(20):
            async with http.get(gw.url + "/x") as resp:
                assert resp.status == 200
                await resp.read()
    finally:
        gw.stop()  # a clean stop flushes the log's last batch
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    durations = [line["duration_ms"] for line in lines if line["path"] == "/x"]
    assert len(durations) == 20
    assert all(d > 0 for d in durations), durations
    assert sum(d != round(d) for d in durations) >= 10, durations
