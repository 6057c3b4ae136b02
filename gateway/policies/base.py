"""The one narrow interface every route policy implements (Envoy's filter chain, small)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable

    from cityplane.problem import Problem
    from gateway.exchange import Exchange


class Policy(Protocol):
    """A policy is compiled once per route when config loads, then asked once per request.

    ``check`` either returns (the request may go on; it may have added headers to
    ``exchange.response_headers`` / ``exchange.upstream_headers``) or raises
    :class:`cityplane.problem.Problem`, which becomes the client's answer.

    A policy that writes wire-form fields to ``exchange.response_block`` names them in a class
    attribute ``response_fields`` (a tuple of field names): the upstream's fields of those
    names are then not relayed.
    """

    name: ClassVar[str]

    def check_now(self, exchange: Exchange) -> bool:
        """``check`` without waiting (docs/adr/0014-inline-exchanges.md): ``True`` when the
        policy decided (the request may go on, or the ``Problem`` was raised), ``False`` when
        deciding needs I/O; then nothing was changed and ``check`` follows."""
        ...

    def check_soon(self, exchange: Exchange, then: Callable[[Problem | None], None]) -> bool:
        """After ``check_now`` said ``False``: start deciding and call ``then`` (from a
        callback, with None to go on or the refusing ``Problem``), returning True; or return
        False (nothing started) and ``check`` is awaited on the connection's task."""
        ...

    async def check(self, exchange: Exchange) -> None: ...
