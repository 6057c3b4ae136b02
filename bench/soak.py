"""The 10-minute soak (issue #6): RSS of a 1,000-route worker under half load, and no failures.

``python -m bench.soak [--minutes N]`` alone (10 minutes by default); not part of
``python -m bench``.

- **gateway**: ``cityplane gateway --workers 1`` pinned to core 0, the 1,000-route city of
  :mod:`bench.routes` (100 services of 10 routes, each service its own upstream cluster) in
  front of one nginx worker, the access log to a file. Every service's ``reports`` route has a
  rate limit that is never reached (:data:`bench.gateway.RATE_LIMIT`), so each of those
  requests pays for the counting.
- **load**: wrk on core 1 cycles over the ``reports`` (rate-limited) and ``items`` routes of
  all 100 services. First ~10 s at saturation; then paced at half that rate (see
  :mod:`bench.wrk` for how wrk is paced) for the soak, in consecutive segments of
  ``--segment`` seconds, so that latency is seen per segment.
- **memory**: the worker's VmRSS (``/proc/PID/status``) every ``--sample`` seconds. Growth is
  the last sample against the first one after ``--warmup`` seconds of paced load (pools fill,
  caches reach their bounds and the allocator its working set in that first minute).

Targets (issue #6): RSS growth < 5 %, no non-2xx answer and no socket error; RSS per worker
≤ 80 MB with 1,000 routes. Results: ``bench/results/soak-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.campaign import paced_load
from bench.gateway import RATE_LIMIT
from bench.nginx import start_upstream
from bench.processes import (
    CORE_LOAD,
    CORE_UNDER_TEST,
    BenchError,
    Supervised,
    Supervisor,
    free_port,
    group_cpu_seconds,
    wait_until_answers,
)
from bench.routes import CITYPLANE, RSS_TARGET_MB, city_documents
from bench.wrk import Load, WrkResult, run_wrk, write_scripts

ROUTES = 1_000
RSS_GROWTH_TARGET_PCT = 5.0
CONNECTIONS = 64

# Requests spread over every service: the reports route (rate-limited) and an items route of
# each, built once per wrk thread (wrk.format) and then handed out in turn. Prepended to
# bench.wrk's scripts, which define init/delay/done but no request hook.
_REQUESTS_LUA = """
local soak_requests = {}
local soak_next = 0
request = function()
  if soak_next == 0 then
    for s = 0, @SERVICES@ - 1 do
      soak_requests[#soak_requests + 1] = wrk.format("GET", "/svc-" .. s .. "/v1/reports/" .. s)
      soak_requests[#soak_requests + 1] = wrk.format("GET", "/svc-" .. s .. "/v1/items/" .. s)
    end
  end
  soak_next = soak_next % #soak_requests + 1
  return soak_requests[soak_next]
end
"""


def soak_documents(upstream_port: int) -> list[dict[str, Any]]:
    """bench.routes' 1,000-route city, every ``reports`` route limited but never refusing."""
    documents = city_documents(ROUTES, upstream=f"http://127.0.0.1:{upstream_port}")
    for document in documents:
        for route in document["spec"]["routes"]:
            if "rateLimit" in route:
                route["rateLimit"] = dict(RATE_LIMIT)
    return documents


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for process {pid}")


def _scripts(workdir: Path, services: int) -> tuple[Path, Path]:
    saturation, paced = write_scripts(workdir)
    prefix = _REQUESTS_LUA.replace("@SERVICES@", str(services))
    scripts = []
    for script in (saturation, paced):
        soak = script.with_name(f"soak-{script.name}")
        soak.write_text(prefix + script.read_text())
        scripts.append(soak)
    return scripts[0], scripts[1]


def start_soak_gateway(
    supervisor: Supervisor, upstream_port: int, access_log: Path
) -> tuple[Supervised, int, int]:
    """The gateway on core 0; (process, port, services), after every service answered once."""
    documents = soak_documents(upstream_port)
    config = supervisor.workdir / "soak-city.json"
    config.write_text("\n---\n".join(json.dumps(d) for d in documents))
    port = free_port()
    argv = [
        str(CITYPLANE),
        "--log-level",
        "warning",
        "gateway",
        "--config",
        str(config),
        "--port",
        str(port),
        "--status-port",
        str(free_port()),
        "--access-log",
        str(access_log),
        "--workers",
        "1",
    ]
    gateway = supervisor.start("soak-gateway", argv, core=CORE_UNDER_TEST)
    wait_until_answers(gateway, port, path="/svc-0/v1/items", timeout=120)
    return gateway, port, len(documents)


def _segment_row(
    index: int, began: float, result: WrkResult, cpu_s: float, rss_end_kib: int
) -> dict[str, Any]:
    return {
        "segment": index,
        "started_s": round(began, 1),
        "cpu_util": round(cpu_s / result.duration_s, 3) if result.duration_s else None,
        "rss_end_mb": round(rss_end_kib / 1024, 1),
        **result.as_dict(),
    }


def run_soak(
    supervisor: Supervisor,
    *,
    minutes: float,
    segment_s: float = 30.0,
    saturation_s: float = 10.0,
    warmup_s: float = 60.0,
    sample_s: float = 10.0,
    connections: int = CONNECTIONS,
    progress: bool = True,
) -> dict[str, Any]:
    """Saturation, then ``minutes`` of paced load in segments while RSS is sampled."""
    workdir = supervisor.workdir
    upstream_port = free_port()
    upstream = start_upstream(supervisor, upstream_port, core=CORE_LOAD)
    access_log = workdir / "soak-access.log"
    gateway, port, services = start_soak_gateway(supervisor, upstream_port, access_log)
    saturation_script, paced_script = _scripts(workdir, services)
    try:
        rss_started = rss_kib(gateway.pid)
        # Saturation: a short warm-up, then the rate half of which the soak runs at.
        run_wrk(Load(connections, 2), port, saturation_script, core=CORE_LOAD)
        saturation = run_wrk(
            Load(connections, saturation_s), port, saturation_script, core=CORE_LOAD
        )
        if progress:
            print(
                f"saturation: {saturation.rps:,.0f} req/s over {saturation.duration_s:.0f} s "
                f"(p99 {saturation.p99_ms:.2f} ms); RSS {rss_kib(gateway.pid) / 1024:.1f} MB",
                flush=True,
            )
        rate = saturation.rps / 2
        total_s = minutes * 60
        count = max(1, math.ceil(total_s / segment_s))
        load = paced_load(rate, total_s / count, connections)
        samples: list[tuple[float, int]] = []
        stop = threading.Event()
        soak_began = time.monotonic()

        def sample() -> None:
            # Every sample_s from the start of the paced load, on a clock of its own.
            while True:
                samples.append((round(time.monotonic() - soak_began, 1), rss_kib(gateway.pid)))
                if stop.wait(sample_s - (time.monotonic() - soak_began) % sample_s):
                    return

        sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
        sampler.start()
        segments = []
        try:
            for index in range(1, count + 1):
                began = time.monotonic() - soak_began
                cpu_before = sum(group_cpu_seconds(gateway.pid))
                result = run_wrk(load, port, paced_script, core=CORE_LOAD)
                cpu_s = sum(group_cpu_seconds(gateway.pid)) - cpu_before
                row = _segment_row(index, began, result, cpu_s, rss_kib(gateway.pid))
                segments.append(row)
                if progress:
                    _print_segment(row, count)
        finally:
            stop.set()
            sampler.join()
        samples.append((round(time.monotonic() - soak_began, 1), rss_kib(gateway.pid)))
        peak_kib = _peak_rss_kib(gateway.pid)
    finally:
        supervisor.stop(gateway)
        supervisor.stop(upstream)
    return {
        "routes": ROUTES,
        "services": services,
        "connections": load.connections,
        "delay_ms": load.delay_ms,
        "saturation": saturation.as_dict(),
        "target_rps": round(rate, 1),
        "rss_started_mb": round(rss_started / 1024, 1),
        "rss_samples": [{"t_s": t, "rss_mb": round(k / 1024, 1)} for t, k in samples],
        "peak_rss_mb": round(peak_kib / 1024, 1),
        "segments": segments,
        "access_log": _access_log_facts(access_log),
        **summarize(samples, segments, warmup_s=warmup_s),
    }


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _access_log_facts(path: Path) -> dict[str, Any]:
    """Its size and lines (one per request, saturation included); then it goes: it is large."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        path.unlink()
    except OSError as exc:
        return {"error": str(exc)}
    return {"bytes": size, "lines": lines}


def summarize(
    samples: Sequence[tuple[float, int]], segments: Sequence[dict[str, Any]], *, warmup_s: float
) -> dict[str, Any]:
    """RSS after warm-up against the end, totals, and whether issue #6's targets are met."""
    after_warmup = next((k for t, k in samples if t >= warmup_s), samples[-1][1])
    end = samples[-1][1]
    growth = (end - after_warmup) / after_warmup * 100
    worst = max(k for _, k in samples)
    requests = sum(s["requests"] for s in segments)
    non_2xx = sum(s["non_2xx"] for s in segments)
    socket_errors = sum(s["socket_errors"] for s in segments)
    return {
        "rss_after_warmup_mb": round(after_warmup / 1024, 1),
        "rss_end_mb": round(end / 1024, 1),
        "rss_max_mb": round(worst / 1024, 1),
        "rss_growth_pct": round(growth, 2),
        "requests": requests,
        "non_2xx": non_2xx,
        "socket_errors": socket_errors,
        "met": {
            "rss_growth": growth < RSS_GROWTH_TARGET_PCT,
            "no_failures": non_2xx == 0 and socket_errors == 0,
            "rss_per_worker": worst / 1024 <= RSS_TARGET_MB,
        },
    }


def _print_segment(row: dict[str, Any], count: int) -> None:
    problems = []
    if row["non_2xx"]:
        problems.append(f"{row['non_2xx']} non-2xx")
    if row["socket_errors"]:
        problems.append(f"{row['socket_errors']} socket errors")
    flag = f"  !! {', '.join(problems)}" if problems else ""
    cpu = f"cpu {row['cpu_util']:4.0%}" if row["cpu_util"] is not None else ""
    print(
        f"  segment {row['segment']:>2}/{count} at {row['started_s']:>5.0f} s"
        f" {row['rps']:>8,.0f} req/s  p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms"
        f"  {cpu}  RSS {row['rss_end_mb']:.1f} MB{flag}",
        flush=True,
    )


def print_soak(result: dict[str, Any]) -> None:
    met = result["met"]

    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print(
        f"\nsoak: {result['routes']} routes, paced at ~{result['target_rps']:,.0f} req/s "
        f"(half of {result['saturation']['rps']:,.0f}), {len(result['segments'])} segments"
    )
    print(
        f"RSS: {result['rss_started_mb']} MB started, {result['rss_after_warmup_mb']} MB after "
        f"warm-up, {result['rss_end_mb']} MB at the end ({result['rss_growth_pct']:+.2f} %, "
        f"target < {RSS_GROWTH_TARGET_PCT:g} %: {mark(met['rss_growth'])}); max sampled "
        f"{result['rss_max_mb']} MB, peak (VmHWM) {result['peak_rss_mb']} MB "
        f"(≤ {RSS_TARGET_MB:g} MB: {mark(met['rss_per_worker'])})"
    )
    print(
        f"requests: {result['requests']:,}; non-2xx {result['non_2xx']}, socket errors "
        f"{result['socket_errors']} ({mark(met['no_failures'])}); access log "
        f"{result['access_log'].get('lines', '?')} lines"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description="Soak: RSS and failures of a 1,000-route gateway at half its saturation.",
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="paced load (default 10)")
    parser.add_argument("--segment", type=float, default=30.0, help="seconds per wrk run")
    parser.add_argument("--saturation", type=float, default=10.0, help="saturation run, s")
    parser.add_argument("--warmup", type=float, default=60.0, help="RSS baseline after, s")
    parser.add_argument("--sample", type=float, default=10.0, help="RSS sampling interval, s")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    from bench.tools import ensure_tools, git_state, load_average, machine, timestamp

    began = time.monotonic()
    load_before = load_average()
    try:
        ensure_tools()
        with (
            tempfile.TemporaryDirectory(prefix="cityplane-soak-") as tmp,
            Supervisor(Path(tmp)) as supervisor,
        ):
            result = run_soak(
                supervisor,
                minutes=args.minutes,
                segment_s=args.segment,
                saturation_s=args.saturation,
                warmup_s=args.warmup,
                sample_s=args.sample,
            )
    except BenchError as exc:
        print(f"bench.soak: {exc}", file=sys.stderr)
        return 1
    result = {
        "benchmark": "soak",
        "date": timestamp().isoformat(),
        **git_state(),
        "machine": machine(),
        "load_average": {"before": load_before, "after": load_average()},
        "minutes": args.minutes,
        **result,
        "runtime_s": round(time.monotonic() - began, 1),
    }
    print_soak(result)
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"soak-{result['date'].replace(':', '')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nresults: {path}; commit {result['commit']}; {result['runtime_s']:.0f} s")
    return 0 if all(result["met"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
