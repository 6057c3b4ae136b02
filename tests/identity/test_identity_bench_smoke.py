"""The identity benchmark (bench/identity.py) still runs against a real hub process and returns
numbers, so it does not rot between benchmark runs. No timing assertions: the machine is shared.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from bench.identity import (
    CLIENT_CREDENTIALS,
    REFRESH_TOKEN,
    measure_logins,
    measure_validation,
    measure_wrk,
)
from bench.identity_server import HubUnderTest, register_clients, start_hub
from bench.processes import Supervisor, free_port
from bench.wrk import Load

pytestmark = pytest.mark.skipif(
    shutil.which("wrk") is None or shutil.which("taskset") is None or (os.cpu_count() or 1) < 2,
    reason="the identity benchmark needs wrk, taskset and two cores",
)


def test_identity_bench_measures_grants_logins_and_cached_token_checks(tmp_path: Path) -> None:
    with Supervisor(tmp_path) as supervisor:
        port, data_dir = free_port(), tmp_path / "hub"
        hub = HubUnderTest(start_hub(supervisor, port, data_dir), port, data_dir)
        asyncio.run(register_clients(hub))
        load = Load(connections=4, duration=1)
        grants = measure_wrk(hub, CLIENT_CREDENTIALS, load, 0, tmp_path, 1)
        refreshes = measure_wrk(hub, REFRESH_TOKEN, load, 0, tmp_path, 1)
        logins = measure_logins(hub, duration=1.0, warmup=0.2, users=2, round_=1)
        check = measure_validation(hub, tmp_path, 1, calls=200)

    for run in (grants, refreshes, logins):
        assert run.errors == 0, run
        assert run.requests > 0 and run.rps > 0, run
        assert run.cpu_util is not None and run.cpu_us_per_request, run
    assert check.cpu_us_per_request is not None and check.cpu_us_per_request > 0
    assert check.notes["first_sight_us"] > 0
