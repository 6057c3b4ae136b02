"""The soak benchmark's code, end to end in ~10 s (the real soak is `python -m bench.soak`).

No timing or memory figures are asserted: they depend on the machine. What is asserted is
that the soak drives a real 1,000-route gateway through nginx with wrk, segment after segment,
samples its RSS, and counts failures.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bench.processes import Supervisor
from bench.soak import ROUTES, run_soak, soak_documents, summarize

needs_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nginx", "wrk", "taskset")) or (os.cpu_count() or 1) < 2,
    reason="the soak needs nginx, wrk, taskset and two cores",
)


def test_soak_city_has_a_thousand_routes_and_rate_limits_that_never_refuse() -> None:
    documents = soak_documents(upstream_port=9)
    routes = [r for d in documents for r in d["spec"]["routes"]]
    limits = [r["rateLimit"] for r in routes if "rateLimit" in r]
    assert len(routes) == ROUTES
    assert len(limits) == len(documents)
    assert all(limit["requests"] >= 1_000_000 for limit in limits)


def test_rss_growth_is_measured_from_the_first_sample_after_warm_up() -> None:
    samples = [(0.0, 50_000), (10.0, 60_000), (20.0, 61_000), (30.0, 63_000)]
    segment = {"requests": 10, "non_2xx": 0, "socket_errors": 0}
    summary = summarize(samples, [segment, segment], warmup_s=10.0)
    assert summary["rss_growth_pct"] == 5.0
    assert summary["met"]["rss_growth"] is False
    assert summary["requests"] == 20
    assert summary["met"]["no_failures"] is True


@needs_tools
def test_short_soak_serves_every_paced_request_and_samples_rss(tmp_path: Path) -> None:
    with Supervisor(tmp_path) as supervisor:
        result = run_soak(
            supervisor,
            minutes=6 / 60,
            segment_s=3,
            saturation_s=1,
            warmup_s=2,
            sample_s=1,
            progress=False,
        )
    assert len(result["segments"]) == 2
    assert result["requests"] > 0
    assert result["non_2xx"] == 0
    assert result["socket_errors"] == 0
    assert len(result["rss_samples"]) >= 3
    # One access-log line per request answered, the saturation run's included.
    assert result["access_log"]["lines"] >= result["requests"]
