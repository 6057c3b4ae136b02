"""Processes under test: started pinned to a core, in their own group, always killed.

Every process gets its own session (so a Ctrl-C in the terminal reaches only the benchmark,
which then stops its children in order) and its stdout/stderr in files of the work directory,
which are shown when a process fails to start.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

# Cores: the process under test gets one, the load generator and the upstream share the other.
CORE_UNDER_TEST = 0
CORE_LOAD = 1


class BenchError(Exception):
    """An expected failure (a tool missing, a server that does not start): one message, exit 1."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Supervised:
    """One started process: its argv, log files and Popen handle."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], stdout: Path, stderr: Path):
        self.name = name
        self.proc = proc
        self.stdout = stdout
        self.stderr = stderr

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output_tail(self, lines: int = 30) -> str:
        parts = []
        for path in (self.stderr, self.stdout):
            try:
                text = path.read_text(errors="replace").strip()
            except OSError:
                continue
            if text:
                parts.append("\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts) or "(no output)"


class Supervisor:
    """Starts processes and stops every one of them on exit, error or Ctrl-C."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._running: list[Supervised] = []
        self._counter = 0

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def start(self, name: str, argv: Sequence[str], *, core: int | str) -> Supervised:
        """Start ``argv`` on ``core`` (a core number, or a taskset list such as "0,1")."""
        self._counter += 1
        stem = self.workdir / f"{self._counter:03d}-{name}"
        stdout, stderr = stem.with_suffix(".out"), stem.with_suffix(".err")
        with stdout.open("wb") as out, stderr.open("wb") as err:
            proc = subprocess.Popen(
                ["taskset", "-c", str(core), *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        started = Supervised(name, proc, stdout, stderr)
        self._running.append(started)
        return started

    def stop(self, started: Supervised, timeout: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL it if it is still there after ``timeout``."""
        if started in self._running:
            self._running.remove(started)
        proc = started.proc
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        # Children left behind (nginx workers, say) go with the group.
        _signal_group(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for started in reversed(list(self._running)):
            self.stop(started)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return


def wait_until_answers(
    started: Supervised,
    port: int,
    *,
    path: str = "/",
    headers: Mapping[str, str] | None = None,
    timeout: float = 20.0,
) -> None:
    """Poll ``GET path`` until a 200, or raise with the process's output if it never comes."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if started.proc.poll() is not None:
            raise BenchError(
                f"{started.name} exited with code {started.proc.returncode} before answering:\n"
                + started.output_tail()
            )
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
        try:
            conn.request("GET", path, headers=dict(headers or {}))
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                return
            last = f"HTTP {response.status}"
        except (OSError, http.client.HTTPException) as exc:
            last = str(exc) or type(exc).__name__
        finally:
            conn.close()
        time.sleep(0.05)
    raise BenchError(
        f"{started.name} did not answer 200 on port {port} within {timeout:g}s ({last}):\n"
        + started.output_tail()
    )


_TICKS = os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of every live process in the group (nginx master, worker)."""
    user = system = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name (field 2) may hold spaces; the fields after its ")" are fixed.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[2]) == pgid:
            user += int(fields[11])
            system += int(fields[12])
    return user / _TICKS, system / _TICKS


def core_times() -> dict[int, tuple[int, int]]:
    """Per core, (busy, total) jiffies since boot, from /proc/stat."""
    times: dict[int, tuple[int, int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            name, _, rest = line.partition(" ")
            if not (name.startswith("cpu") and name[3:].isdigit()):
                continue
            values = [int(v) for v in rest.split()]
            idle = values[3] + values[4]  # idle + iowait
            total = sum(values[:8])  # user nice system idle iowait irq softirq steal
            times[int(name[3:])] = (total - idle, total)
    return times


def core_busy(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> list[float]:
    """Share of each core that was busy (anyone's work) between two `core_times()`."""
    shares = []
    for core in sorted(after):
        busy = after[core][0] - before.get(core, (0, 0))[0]
        total = after[core][1] - before.get(core, (0, 0))[1]
        shares.append(round(busy / total, 3) if total else 0.0)
    return shares
