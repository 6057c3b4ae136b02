"""The one narrow interface every route policy implements (Envoy's filter chain, small)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from gateway.exchange import Exchange


class Policy(Protocol):
    """A policy is compiled once per route when config loads, then asked once per request.

    ``check`` either returns (the request may go on; it may have added headers to
    ``exchange.response_headers`` / ``exchange.upstream_headers``) or raises
    :class:`cityplane.problem.Problem`, which becomes the client's answer.
    """

    name: ClassVar[str]

    def check_now(self, exchange: Exchange) -> bool:
        """``check`` without waiting (docs/adr/0014-inline-exchanges.md): ``True`` when the
        policy decided (the request may go on, or the ``Problem`` was raised), ``False`` when
        deciding needs I/O; then nothing was changed and ``check`` follows."""
        ...

    async def check(self, exchange: Exchange) -> None: ...
