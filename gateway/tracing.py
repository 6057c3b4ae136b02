"""W3C Trace Context propagation, and OpenTelemetry spans when an exporter is configured.

Without an exporter (the default) the gateway still continues or starts a trace: it forwards a
`traceparent` whose trace-id is the client's (or a new one) and whose parent-id is a new span
id for this hop, at the cost of one random number. With an exporter, each request gets a
server span and each upstream attempt a client span (OpenTelemetry SDK, OTLP over HTTP).
"""

from __future__ import annotations

import os
import re
from typing import Any

# https://www.w3.org/TR/trace-context/#traceparent-header-field-values
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16

# Random hex digits made ~200 ids at a time: one getrandbits().to_bytes().hex() per id cost
# ~1k instructions of a request's three ids (request, trace, span), a slice of this ~0.5k.
# os.urandom, not getrandbits(8192): a big int's bits, bytes and digits cost ~50k
# instructions per refill; the kernel's generator a few thousand.
_POOL_BYTES = 4096


class _HexPool:
    """Random hex digits, handed out from the front and made again when they run out. Its
    state is slots, not module globals: a module global that is assigned on every call makes
    each read of it a dict lookup (measured: twice the cost of the getrandbits it replaced)."""

    __slots__ = ("digits", "taken")

    def __init__(self) -> None:
        self.digits = ""
        self.taken = 0

    def take(self, count: int) -> str:
        start = self.taken
        end = start + count
        if end > len(self.digits):
            self.digits = os.urandom(_POOL_BYTES).hex()
            start, end = 0, count
        self.taken = end
        return self.digits[start:end]

    def forget(self) -> None:
        """In a forked worker: not the digits its parent (or a sibling) will hand out."""
        self.digits = ""
        self.taken = 0


_POOL = _HexPool()
os.register_at_fork(after_in_child=_POOL.forget)


def random_hex(digits: int) -> str:
    """``digits`` random lower-case hex digits (from ``os.urandom``)."""
    pool: _HexPool = _POOL  # typed: take() is a C call (ADR 17/18)
    return pool.take(digits)


def continue_trace(incoming: str | None) -> tuple[str, str]:
    """Return (trace_id, traceparent for the upstream) for this hop."""
    span_id = random_hex(16)
    if span_id == _ZERO_SPAN:  # invalid in a traceparent; one in 2**64
        span_id = "0" * 15 + "1"
    if incoming:
        m = _TRACEPARENT.match(incoming.strip())
        if m and m.group(1) != "ff" and m.group(2) != _ZERO_TRACE and m.group(3) != _ZERO_SPAN:
            trace_id = m.group(2)
            return trace_id, f"00-{trace_id}-{span_id}-{m.group(4)}"
    trace_id = random_hex(32)
    if trace_id == _ZERO_TRACE:  # invalid; one in 2**128
        trace_id = "0" * 31 + "1"
    return trace_id, f"00-{trace_id}-{span_id}-01"


class Tracing:
    """Owns the OpenTelemetry tracer when spans are exported; a no-op otherwise."""

    __slots__ = (
        "_provider",
        "_tracer",
        "enabled",
    )

    def __init__(self, otlp_endpoint: str | None = None, *, provider: Any = None) -> None:
        self.enabled = bool(otlp_endpoint or provider)
        self._tracer: Any = None
        self._provider: Any = provider
        if not self.enabled:
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider

        if self._provider is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            self._provider = TracerProvider(
                resource=Resource.create({"service.name": "cityplane-gateway"})
            )
            # BatchSpanProcessor exports from its own thread: no I/O on the event loop.
            self._provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint))
            )
        self._tracer = self._provider.get_tracer("cityplane.gateway")

    def server_span(self, method: str, route: str, traceparent: str | None) -> Any:
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier = {"traceparent": traceparent} if traceparent else {}
        ctx = TraceContextTextMapPropagator().extract(carrier)
        return self._tracer.start_span(
            f"{method} {route}",
            context=ctx,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route},
        )

    def client_span(self, parent: Any, method: str, url: str) -> tuple[Any, str]:
        """Start an upstream span under ``parent``; returns it and its traceparent."""
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        ctx = trace.set_span_in_context(parent)
        span = self._tracer.start_span(
            f"{method}",
            context=ctx,
            kind=SpanKind.CLIENT,
            attributes={"http.request.method": method, "url.full": url},
        )
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(span))
        return span, carrier["traceparent"]

    def shutdown(self) -> None:
        if self._provider is not None and hasattr(self._provider, "shutdown"):
            self._provider.shutdown()
