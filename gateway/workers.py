"""`--workers N`: N gateway processes on one port (SO_REUSEPORT) under a small supervisor.

The kernel spreads connections over the workers. The supervisor owns the status port: it is
ready while every worker is alive, aggregates their metrics (prometheus_client's multiprocess
mode, set up before any metric exists), forwards SIGHUP (reload) and SIGTERM (drain), and
restarts a worker that dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import shutil
import signal
import tempfile
from typing import Any

log = logging.getLogger("cityplane.gateway")


def _child(settings: Any) -> None:
    from gateway.runtime import serve

    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    code = 0
    try:
        asyncio.run(serve(settings))
    except Exception:
        log.exception("gateway worker %d failed", os.getpid())
        code = 1
    os._exit(code)


def run_workers(settings: Any, count: int) -> int:
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    assert metrics_dir, "PROMETHEUS_MULTIPROC_DIR must be set before metrics are imported"
    worker_settings = dataclasses.replace(settings, reuse_port=True, status_port=None)
    children: dict[int, int] = {}  # pid -> slot

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:
            _child(worker_settings)
        children[pid] = slot

    # Python's gc docs: freeze right before fork() so that collections in the workers never
    # write to the objects they share with this process (copy-on-write keeps them shared).
    gc.collect()
    gc.freeze()
    for slot in range(count):
        spawn(slot)

    class Supervisor:
        ready = True
        draining = False
        revision = 0

    sup = Supervisor()

    async def supervise() -> None:
        from aiohttp import web
        from prometheus_client import multiprocess

        from gateway.status import status_app

        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def forward_hup() -> None:
            for pid in list(children):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)

        loop.add_signal_handler(signal.SIGHUP, forward_hup)
        runner = web.AppRunner(status_app(sup), access_log=None)
        await runner.setup()
        if settings.status_port is not None:
            await web.TCPSite(
                runner, settings.status_host or settings.host, settings.status_port
            ).start()
        log.info("gateway supervisor: %d workers on %s:%d", count, settings.host, settings.port)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG: no wait
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                slot = children.pop(pid, None)
                multiprocess.mark_process_dead(pid)
                if slot is not None and not stop.is_set():
                    log.warning("worker %d exited (%d); restarting", pid, status)
                    spawn(slot)
        sup.ready = False
        sup.draining = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = loop.time() + settings.drain_timeout + 5
        while children and loop.time() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG: no wait
            except ChildProcessError:
                break
            if pid == 0:
                await asyncio.sleep(0.05)
                continue
            children.pop(pid, None)
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await runner.cleanup()

    try:
        asyncio.run(supervise())
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def prepare_multiprocess_metrics() -> None:
    """Must run before anything imports prometheus_client metrics."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="cityplane-metrics-")
