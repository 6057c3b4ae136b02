"""`python -m bench.instructions` counts a gateway's instructions per request (a short run)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    not all(shutil.which(t) for t in ("valgrind", "callgrind_control", "nginx")),
    reason="needs valgrind and nginx (Debian packages)",
)
def test_a_short_run_counts_instructions_per_request(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.instructions",
            *("--only", "gateway", "--forms", "compiled", "--requests", "80", "--warmup", "16"),
            *("--results", str(tmp_path)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (result,) = tmp_path.glob("instructions-*.json")
    (row,) = json.loads(result.read_text())["rows"]
    assert row["configuration"] == "gateway" and row["requests"] == 80
    # A proxied request is tens of thousands of instructions at least, and far from millions.
    assert 20_000 < row["per_request"] < 2_000_000, row


def test_an_unknown_configuration_is_a_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.instructions", "--only", "nginx-turbo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "unknown: nginx-turbo" in done.stderr
    assert "Traceback" not in done.stderr
