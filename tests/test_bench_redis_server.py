"""`python -m bench`'s own Redis for gateway-redis: started pinned to the load core, without
persistence, stopped with the benchmark; when it cannot run, gateway-redis is skipped with
the reason instead of failing the benchmark.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from redis import Redis

from bench import cli
from bench.processes import CORE_LOAD, Supervisor, free_port
from bench.redis_server import MISSING, local_url, redis_answers, start_redis


@pytest.mark.skipif(
    not all(shutil.which(t) for t in ("redis-server", "taskset")),
    reason="needs redis-server and taskset",
)
def test_bench_redis_runs_pinned_to_the_load_core_without_persistence_until_the_bench_ends() -> (
    None
):
    port = free_port()
    with (
        tempfile.TemporaryDirectory(prefix="cityplane-bench-test-") as tmp,
        Supervisor(Path(tmp)) as supervisor,
    ):
        started = start_redis(supervisor, port, core=CORE_LOAD)
        assert redis_answers(local_url(port))
        assert os.sched_getaffinity(started.pid) == {CORE_LOAD}
        client = Redis(port=port)
        try:
            assert client.config_get("save") == {"save": ""}
            assert client.config_get("appendonly") == {"appendonly": "no"}
            assert client.config_get("bind")["bind"] == "127.0.0.1"
        finally:
            client.close()
    assert started.proc.poll() is not None
    assert not redis_answers(local_url(port))


def test_gateway_redis_uses_the_benchs_own_redis_unless_a_url_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert cli.build_parser().parse_args([]).redis is None
    monkeypatch.setattr(cli, "redis_server_installed", lambda: True)
    assert cli._redis_unusable(None) is None
    monkeypatch.setattr(cli, "redis_server_installed", lambda: False)
    assert cli._redis_unusable(None) == MISSING
    assert "redis-server is not installed" in MISSING


def test_a_given_redis_that_does_not_answer_skips_gateway_redis_with_its_url() -> None:
    url = local_url(free_port())  # nothing listens there
    assert cli._redis_unusable(url) == f"Redis does not answer at {url}"
