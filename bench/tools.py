"""What the benchmark needs from the machine, and what it records about it.

nginx and wrk come from Debian's packages only (installed with apt-get when missing, as root);
nothing is downloaded from anywhere else.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.processes import BenchError

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"nginx": "nginx-light", "wrk": "wrk", "taskset": "util-linux"}


def ensure_tools() -> None:
    missing = [tool for tool in PACKAGES if shutil.which(tool) is None]
    if not missing:
        return
    packages = sorted({PACKAGES[tool] for tool in missing})
    if os.geteuid() != 0:
        raise BenchError(
            f"missing {', '.join(missing)}: run `sudo apt-get install -y {' '.join(packages)}`"
        )
    print(f"installing {' '.join(packages)} from Debian's packages ...", flush=True)
    if not _apt_install(packages):
        # A fresh container has no package lists yet: fetch them once, then try again.
        _apt(["update", "-qq"])
        if not _apt_install(packages):
            raise BenchError(f"apt-get install {' '.join(packages)} failed; see above")
    still = [tool for tool in PACKAGES if shutil.which(tool) is None]
    if still:
        raise BenchError(f"still missing after apt-get install: {', '.join(still)}")


def _apt_install(packages: list[str]) -> bool:
    return _apt(["install", "-y", "-qq", *packages]) == 0


def _apt(args: list[str]) -> int:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *args], env=env, check=False).returncode


def require_two_cores() -> None:
    cores = os.cpu_count() or 1
    if cores < 2:
        raise BenchError(
            "the benchmark pins the process under test and the load generator to different "
            f"cores; this machine has {cores}"
        )


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def _output(argv: list[str], *, strip: bool = True) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=REPO)
    except OSError:
        return ""
    text = done.stdout or done.stderr
    return text.strip() if strip else text


def git_state() -> dict[str, Any]:
    # Porcelain lines are "XY path": the leading status column may be a space.
    changed = _output(["git", "status", "--porcelain", "--", "gateway", "cityplane"], strip=False)
    return {
        "commit": _output(["git", "rev-parse", "--short", "HEAD"]) or "unknown",
        # Uncommitted changes to the code under test make the commit an approximation.
        "dirty_files": [line[3:] for line in changed.splitlines() if len(line) > 3],
        # Compiled (ADR 15) or the Python sources: what the gateway processes under test load.
        "gateway_modules": GATEWAY_MODULES,
    }


def _gateway_modules() -> str:
    from gateway.speedups import status

    return status()


# Judged when the benchmark starts, as its gateways are: sources edited during a long run
# (the soak) must not relabel the run at its end.
GATEWAY_MODULES = _gateway_modules()


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": _output(["nginx", "-v"]).removeprefix("nginx version: "),
        "wrk": _output(["wrk", "--version"]).split(" [", 1)[0],
    }


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def timestamp() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)
