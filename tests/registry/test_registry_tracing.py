"""The registry traces its requests (OpenTelemetry server spans, W3C traceparent continued)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from registry.app import RegistrySettings, start_registry


async def test_registry_request_becomes_a_server_span_in_the_callers_trace(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = await start_registry(
        RegistrySettings(port=0, data_dir=tmp_path, tracer_provider=provider)
    )
    try:
        trace_id = "0af7651916cd43dd8448eb211c80319c"
        headers = {
            "traceparent": f"00-{trace_id}-b7ad6b7169203331-01",
            "Authorization": f"Bearer {registry.admin_token}",
        }
        async with (
            aiohttp.ClientSession() as http,
            http.get(registry.url + "/v1/services", headers=headers) as r,
        ):
            assert r.status == 200
    finally:
        await registry.stop()
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "GET /v1/services"]
    assert f"{span.context.trace_id:032x}" == trace_id
    assert span.attributes["http.response.status_code"] == 200


async def test_an_oversized_request_line_is_a_414_problem(tmp_path: Path) -> None:
    registry = await start_registry(RegistrySettings(port=0, data_dir=tmp_path))
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(registry.url + "/v1/services?x=" + "a" * 9000) as r,
        ):
            assert r.status == 414 and r.content_type == "application/problem+json"
    finally:
        await registry.stop()
