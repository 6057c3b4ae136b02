"""The ``cityplane`` command line run as an operator runs it: a child process, text output."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: Path = ROOT,
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    """``python -m cityplane.cli ARGS`` in ``cwd``. ``env`` is the child's whole environment
    (None: this process's); `environment` builds one from this process's."""
    return subprocess.run(
        [sys.executable, "-m", "cityplane.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else dict(env),
    )


def environment(
    extra: Mapping[str, str] | None = None, *, without_prefix: str | None = None
) -> dict[str, str]:
    """This process's environment plus ``extra``, without the names that start with
    ``without_prefix`` (settings a test must not inherit, e.g. ``CITYPLANE_``)."""
    base = {
        k: v for k, v in os.environ.items() if not (without_prefix and k.startswith(without_prefix))
    }
    return base | dict(extra or {})
