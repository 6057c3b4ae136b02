"""One request's passage through the gateway: what policies read and write."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.h1server import IncomingRequest


class Exchange:
    """Per-request state handed along the route's policy chain.

    Kept to slots and plain attributes: it is allocated once per request on the hot path.
    """

    __slots__ = (
        "client_ip",
        "consumer",
        "identity",
        "path",
        "request",
        "request_id",
        "response_block",
        "response_headers",
        "route_id",
        "start",
        "upstream_block",
        "upstream_headers",
    )

    def __init__(
        self,
        request: IncomingRequest,
        *,
        client_ip: str,
        path: str,
        route_id: str,
        request_id: str,
        start: float,
    ) -> None:
        self.request = request
        self.client_ip = client_ip
        self.path = path  # normalized path, what routing matched
        self.route_id = route_id  # "service/route", stable across reloads
        self.request_id = request_id
        self.start = start
        # Set by the auth policy once a token is verified: the token's client or subject.
        self.consumer: str | None = None
        self.identity: dict[str, Any] | None = None
        # Extra headers for the client's response, from a policy (checked when encoded) ...
        self.response_headers: list[tuple[str, str]] = []
        # ... and the gateway's own, ready-made ("Name: value\r\n" each; the RateLimit
        # fields). Their names are in the policy's `response_fields`, so that the upstream's
        # fields of the same name are dropped.
        self.response_block = b""
        # Extra headers for the upstream request (verified identity, …).
        self.upstream_headers: list[tuple[str, str]] = []
        # ... and ready-made wire lines of them ("Name: value\r\n" each; the auth policy's
        # identity fields, encoded once per verified token).
        self.upstream_block = b""
