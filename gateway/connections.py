"""What one client connection may cost: limits, clocks and the connection cap
(docs/adr/0011-slow-clients.md), and the server they configure (`gateway.h1server`,
docs/adr/0013-own-http1-server.md).

`gateway/server.py` is the request path; this module and `gateway/h1server.py` are below it.
"""

from __future__ import annotations

import resource
from typing import TYPE_CHECKING, Any

from gateway import metrics

if TYPE_CHECKING:
    from gateway.h1server import FrontServer


def default_max_connections() -> int:
    """Half the file-descriptor limit, at most 10,000.

    Each client connection may hold an upstream connection too, and the process needs a few
    descriptors of its own; running out of them fails accept() for everyone.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 10_000
    return max(64, min(10_000, soft // 2))


class GatewayLimits:
    """What one client connection may cost; see docs/adr/0011-slow-clients.md."""

    __slots__ = (
        "body_timeout",
        "header_timeout",
        "idle_timeout",
        "max_body",
        "max_connections",
        "max_field_size",
        "max_headers",
        "max_line_size",
    )

    def __init__(
        self,
        *,
        max_body: int = 10 * 1024 * 1024,
        max_line_size: int = 8190,
        max_field_size: int = 8190,
        max_headers: int = 100,
        header_timeout: float = 10.0,
        idle_timeout: float = 75.0,
        body_timeout: float = 30.0,
        max_connections: int | None = None,
    ) -> None:
        for name, value in (
            ("header_timeout", header_timeout),
            ("idle_timeout", idle_timeout),
            ("body_timeout", body_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, not {value!r}")
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections!r}")
        self.max_body = max_body
        self.max_line_size = max_line_size
        self.max_field_size = max_field_size
        self.max_headers = max_headers
        # From the first byte of a request until its head is complete (nginx's
        # client_header_timeout, Envoy's request_headers_timeout).
        self.header_timeout = header_timeout
        # A keep-alive connection with no request in progress (nginx's keepalive_timeout).
        self.idle_timeout = idle_timeout
        # The longest gap between two reads of a request body (nginx's client_body_timeout).
        self.body_timeout = body_timeout
        self.max_connections = (
            max_connections if max_connections is not None else default_max_connections()
        )


def make_server(handler: Any, limits: GatewayLimits) -> FrontServer:
    """The protocol factory for a request path (`gateway.server.RequestPath`) under `limits`."""
    # Imported here, not at the top: gateway.h1server types its connections' limits with
    # GatewayLimits (compiled, a cimport, ADR 17), which needs this module not to import it.
    from gateway.h1server import FrontServer

    return FrontServer(handler, limits, on_refused=metrics.CONNECTIONS_REFUSED.inc)
