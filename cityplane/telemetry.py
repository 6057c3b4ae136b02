"""OpenTelemetry for the aiohttp parts (identity hub, registry): a server span per request,
continuing the caller's W3C `traceparent`, exported over OTLP/HTTP when an endpoint is set.

Without an endpoint nothing is imported or recorded. The exporter runs in the SDK's batch
thread, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def tracer_provider(service: str, otlp_endpoint: str) -> Any:
    """An SDK tracer provider exporting to `otlp_endpoint` (OTLP over HTTP) in batches."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    return provider


def tracing_middleware(provider: Any, instrumentation: str) -> Any:
    """aiohttp middleware: one SERVER span per request, named `METHOD route`, with the status."""
    from opentelemetry.trace import SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    tracer = provider.get_tracer(instrumentation)
    propagator = TraceContextTextMapPropagator()

    @web.middleware
    async def traced(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        carrier = {"traceparent": request.headers.get("traceparent", "")}
        context = propagator.extract(carrier) if carrier["traceparent"] else None
        with tracer.start_as_current_span(
            f"{request.method} {route}",
            context=context,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": request.method, "http.route": route},
        ) as span:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                span.set_attribute("http.response.status_code", exc.status)
                raise
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            return response

    return traced
