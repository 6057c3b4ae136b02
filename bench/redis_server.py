"""gateway-redis's Redis: a ``redis-server`` of the benchmark's own, pinned like the upstream.

The machine's Redis (6379) is shared and not pinned: the scheduler can run it on the core under
test, where its CPU would be charged to the gateway's throughput, and other people's tests load
it at the same time. Issue #6's method gives the process under test a core of its own and puts
everything it talks to on the other one, so the benchmark starts Debian's ``redis-server`` in the
foreground on a free port, pinned to the load core with the upstream nginx and wrk. Persistence
is off (``--save ""``, ``--appendonly no``): an RDB snapshot would fork during a run, and the
counters are worth nothing after it. ``python -m bench --redis URL`` measures another Redis
instead, as it is.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from urllib.parse import urlsplit

from bench.processes import BenchError, Supervised, Supervisor

REDIS_SERVER = "redis-server"
MISSING = "redis-server is not installed (`apt-get install -y redis-server`) and no --redis URL"


def redis_server_installed() -> bool:
    return shutil.which(REDIS_SERVER) is not None


def redis_server_version() -> str:
    """``7.0.15``, from ``redis-server --version`` (``Redis server v=7.0.15 sha=…``)."""
    try:
        done = subprocess.run(
            [REDIS_SERVER, "--version"], capture_output=True, text=True, check=False
        )
    except OSError:
        return "unknown"
    for word in done.stdout.split():
        if word.startswith("v="):
            return word.removeprefix("v=")
    return "unknown"


def local_url(port: int) -> str:
    return f"redis://127.0.0.1:{port}/0"


def start_redis(supervisor: Supervisor, port: int, *, core: int) -> Supervised:
    """Start the benchmark's Redis on ``port``, pinned to ``core``; return once it answers."""
    argv = [
        REDIS_SERVER,
        *("--bind", "127.0.0.1", "--port", str(port)),
        *("--save", "", "--appendonly", "no"),
        *("--dir", str(supervisor.workdir)),
    ]
    started = supervisor.start("redis", argv, core=core)
    wait_until_pong(started, local_url(port))
    return started


def wait_until_pong(started: Supervised, url: str, *, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if started.proc.poll() is not None:
            raise BenchError(
                f"{started.name} exited with code {started.proc.returncode} before answering:\n"
                + started.output_tail()
            )
        if redis_answers(url):
            return
        time.sleep(0.05)
    raise BenchError(
        f"{started.name} did not answer PING at {url} within {timeout:g}s:\n"
        + started.output_tail()
    )


def redis_answers(url: str) -> bool:
    """A raw PING, so that the benchmark itself needs no Redis client."""
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or 6379), timeout=1.0
        ) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False
