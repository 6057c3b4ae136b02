"""Gateway and redis-server processes for tests that need real, separate processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml
from aiohttp import ClientSession

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Ports free now and distinct from each other: the sockets are held open together while
    the kernel picks them (two calls of one socket each can get the same port back)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


class GatewayProcess:
    def __init__(self, config: Path | None, *extra: str, log_dir: Path | None = None) -> None:
        self.port, self.status_port = free_ports(2)
        self.url = f"http://127.0.0.1:{self.port}"
        self.status_url = f"http://127.0.0.1:{self.status_port}"
        where = log_dir or (config.parent if config else Path("."))
        self.log = where / f"gateway.{self.port}.log"
        source = ["--config", str(config)] if config else []
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cityplane.cli",
                "gateway",
                *source,
                "--port",
                str(self.port),
                "--status-port",
                str(self.status_port),
                "--access-log",
                "off",
                "--watch-interval",
                "0",
                *extra,
            ],
            cwd=ROOT,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    async def ready(self, within: float = 15.0) -> None:
        deadline = time.monotonic() + within
        async with ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"gateway exited: {self.log.read_text()}")
                try:
                    async with http.get(self.status_url + "/readyz") as resp:
                        if resp.status == 200:
                            return
                except OSError:
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError(f"gateway not ready: {self.log.read_text()}")

    def reload(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log_file.close()


class ArrivalUpstream:
    """tests/gateway/arrival_upstream.py in its own process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.gateway.arrival_upstream", str(self.port)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def ready(self, within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        async with ClientSession() as http:
            while time.monotonic() < deadline:
                try:
                    async with http.get(self.url + "/__arrivals") as resp:
                        if resp.status == 200:
                            return
                except OSError:
                    await asyncio.sleep(0.05)
        raise TimeoutError("arrival upstream did not start")

    async def arrivals(self) -> list[float]:
        async with ClientSession() as http, http.get(self.url + "/__arrivals") as resp:
            return list(await resp.json())

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class RedisProcess:
    """A private redis-server on a spare port, for tests that kill it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def write_services(path: Path, services: list[dict]) -> Path:
    path.write_text(yaml.safe_dump_all(services))
    return path
