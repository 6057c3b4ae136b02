"""Waiting for the operator's Ctrl-C or Kubernetes' SIGTERM, the same way in every part."""

from __future__ import annotations

import asyncio
import signal


async def until_stopped() -> None:
    """Return when SIGINT or SIGTERM arrives (the handlers are removed again afterwards)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
