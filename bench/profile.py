"""Where a gateway's time goes under load: py-spy samples of the process under test.

py-spy reads the interpreter's stacks from outside (ptrace / process_vm_readv), so the
gateway runs unmodified. ``--nonblocking``: pausing the gateway at each sample (ptrace) put
about twice the share on the functions that make system calls as the kernel's own user/system
split supports; without pausing, some stacks come out torn (parents missing), so inclusive
shares are lower bounds while self shares hold.
Two recordings: collapsed stacks (summarized here into top functions and packages) and a
flame graph for people. Without py-spy, or when the kernel refuses to let it attach, the
benchmark says so and goes on without a profile.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.processes import CORE_LOAD, BenchError, Supervised
from bench.wrk import Load

PY_SPY = Path(sys.executable).parent / "py-spy"
LOOP_NOTE = (
    "py-spy sees Python frames only: a system call (socket write) counts for the function "
    "that made it; 'event loop' is uvloop's own C code (epoll, reads, callbacks)"
)
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True)
class Frame:
    function: str
    file: str

    @property
    def package(self) -> str:
        """``aiohttp``, ``gateway``, ``asyncio``, ``contextlib``: py-spy's paths are short."""
        head, slash, _ = self.file.partition("/")
        return head if slash else head.removesuffix(".py")

    @property
    def label(self) -> str:
        return f"{self.function} ({self.file})"


# Samples whose innermost Python frame is the loop's runner are time in uvloop's C code.
_RUNNER = Frame("Runner.run", "asyncio/runners.py")
EVENT_LOOP = Frame("event loop", "uvloop, C")
_THREAD = Frame("Thread._bootstrap", "threading.py")


def py_spy_path() -> Path | None:
    if PY_SPY.exists():
        return PY_SPY
    found = shutil.which("py-spy")
    return Path(found) if found else None


def parse_frame(text: str) -> Frame:
    m = _FRAME.match(text.strip())
    if m is None:
        return Frame(text.strip(), "?")
    return Frame(m.group("func"), m.group("file"))


def _from_the_loop(frames: Iterable[Frame]) -> list[Frame]:
    """A stack from the event loop down: startup frames dropped, the loop's own time named.

    Empty for stacks of other threads than the loop's.
    Tasks resumed by the loop are sampled sometimes with, sometimes without the frames that
    started the loop above them; cutting at the loop makes both kinds of stack add up.
    """
    stack = list(frames)
    if stack and stack[0] == _THREAD:
        return []
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] == _RUNNER:
            stack = stack[i + 1 :]
            break
    return stack or [EVENT_LOOP]


def summarize(collapsed: str, top: int = 15) -> dict[str, Any]:
    """Self and inclusive shares per function, self share per package, from collapsed stacks."""
    own: Counter[Frame] = Counter()
    inclusive: Counter[Frame] = Counter()
    packages: Counter[str] = Counter()
    modules: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # py-spy starts each stack with the thread ("process 12:"...); frames follow.
        frames = _from_the_loop(parse_frame(f) for f in stack.split(";") if "(" in f)
        if not frames:
            continue  # another thread: the executor's workers wait there, they serve nothing
        total += count
        own[frames[-1]] += count
        packages[frames[-1].package] += count
        modules[frames[-1].file] += count
        for frame in set(frames):
            inclusive[frame] += count

    def share(counter: Counter[Any]) -> list[dict[str, Any]]:
        return [
            {"name": key.label if isinstance(key, Frame) else key, "share": round(n / total, 4)}
            for key, n in counter.most_common(top)
        ]

    if total == 0:
        return {"samples": 0}
    return {
        "samples": total,
        "self": share(own),
        "inclusive": share(inclusive),
        "packages": share(packages),
        "modules": share(modules),
    }


def record(
    target: Supervised, port: int, script: Path, load: Load, out_dir: Path, seconds: float
) -> dict[str, Any]:
    """Profile ``target`` for ``seconds`` twice (stacks, flame graph) under wrk load."""
    py_spy = py_spy_path()
    if py_spy is None:
        return {"error": "py-spy is not installed (.venv/bin/pip install py-spy)"}
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "profile.txt"
    svg = out_dir / "profile.svg"
    spy_seconds = max(1, round(seconds))
    wrk_load = replace(load, duration=2 * spy_seconds + 4)
    wrk = subprocess.Popen(
        [
            "taskset",
            "-c",
            str(CORE_LOAD),
            *wrk_load.argv(f"http://127.0.0.1:{port}/", script),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for path, fmt in ((raw, "raw"), (svg, "flamegraph")):
            argv = [
                "taskset",
                "-c",
                str(CORE_LOAD),
                str(py_spy),
                "record",
                "--pid",
                str(target.pid),
                "--duration",
                str(spy_seconds),
                "--rate",
                "200",
                "--nonblocking",
                "--format",
                fmt,
                "--output",
                str(path),
            ]
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=spy_seconds + 30, check=False
            )
            if done.returncode != 0 or not path.exists():
                return {
                    "error": "py-spy could not record (ptrace restricted? it needs "
                    f"CAP_SYS_PTRACE): {(done.stderr or done.stdout).strip()[-400:]}"
                }
    except subprocess.TimeoutExpired:
        raise BenchError("py-spy did not finish") from None
    finally:
        wrk.terminate()
        wrk.wait()
    summary = summarize(raw.read_text())
    summary["files"] = {"collapsed": str(raw), "flamegraph": str(svg)}
    summary["configuration"] = target.name
    return summary


def print_profile(summary: dict[str, Any]) -> None:
    if "error" in summary:
        print(f"\nprofile: {summary['error']}")
        return
    if not summary.get("samples"):
        print("\nprofile: no samples")
        return
    name = summary.get("configuration", "the gateway")
    print(f"\nprofile of {name} under load ({summary['samples']} samples)")
    print(
        "  self time by package: "
        + ", ".join(f"{p['name']} {p['share']:.0%}" for p in summary["packages"][:8])
    )
    print(
        "  self time by file: "
        + ", ".join(f"{p['name']} {p['share']:.0%}" for p in summary["modules"][:10])
    )
    print("  top functions by self time:")
    for f in summary["self"][:10]:
        print(f"    {f['share']:6.1%}  {f['name']}")
    print("  top functions by inclusive time:")
    for f in summary["inclusive"][:12]:
        print(f"    {f['share']:6.1%}  {f['name']}")
    print(f"  ({LOOP_NOTE})")
    print(f"  flame graph: {summary['files']['flamegraph']}")
