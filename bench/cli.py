"""``python -m bench``: run the gateway benchmark end to end and print the table.

Expected failures (a tool missing, a server that does not start, Ctrl-C) end with a message
and a non-zero exit, never a traceback; every process started is stopped on the way out.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

from bench.campaign import PACED, SATURATION, Campaign, Plan
from bench.configurations import (
    BY_NAME,
    CONFIGURATIONS,
    DIRECT,
    GATEWAY_FULL,
    GATEWAY_RATELIMIT,
    NGINX_LIMIT_REQ,
    Configuration,
    Environment,
)
from bench.issuer import create_issuer, issuer_url
from bench.nginx import start_upstream
from bench.processes import CORE_LOAD, CORE_UNDER_TEST, BenchError, Supervisor, free_port
from bench.profile import print_profile, record
from bench.redis_server import (
    MISSING,
    local_url,
    redis_answers,
    redis_server_installed,
    redis_server_version,
    start_redis,
)
from bench.report import derive, print_summary, summarize_phase, targets, write_results
from bench.routes import print_routes, run_routes
from bench.tools import (
    REPO,
    ensure_tools,
    git_state,
    load_average,
    machine,
    require_two_cores,
    timestamp,
)
from bench.wrk import Load, write_scripts
from gateway.speedups import DISABLE as NO_EXTENSIONS

RESULTS = REPO / "bench" / "results"
PACED_CONFIGURATIONS = (DIRECT, NGINX_LIMIT_REQ, GATEWAY_RATELIMIT)
# Above this one-minute load average other work competes for the pinned cores.
BUSY_LOAD = 1.5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the CityPlane gateway against nginx on this machine.",
    )
    p.add_argument("--quick", action="store_true", help="smoke check: 1 round of 2 s runs")
    p.add_argument("--rounds", type=int, help="rounds of all configurations (default 3)")
    p.add_argument("--duration", type=float, help="seconds per measured run (default 5)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per run (default 2)")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    p.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"measure only these (repeatable, or comma-separated): {', '.join(BY_NAME)}",
    )
    p.add_argument(
        "--paced",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also measure latency at half the gateway's saturation (default: on, off --quick)",
    )
    p.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="py-spy profile of gateway-full (else gateway-ratelimit) under load "
        "(default: on, off with --quick)",
    )
    p.add_argument(
        "--routes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure routing at scale: 10-10,000 routes, worker RSS (bench/routes.py)",
    )
    p.add_argument(
        "--redis",
        metavar="URL",
        help="measure gateway-redis against this Redis (default: a redis-server of the "
        "benchmark's own, pinned to the load core)",
    )
    p.add_argument("--results", type=Path, default=RESULTS, help="directory for the JSON files")
    return p


def _select(only: list[str] | None) -> list[Configuration]:
    if not only:
        return list(CONFIGURATIONS)
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise BenchError(f"unknown configuration {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    return [c for c in CONFIGURATIONS if c.name in names]


def _redis_unusable(url: str | None) -> str | None:
    """Why gateway-redis cannot run, or None: the given Redis must answer, else we start one."""
    if url is not None:
        return None if redis_answers(url) else f"Redis does not answer at {url}"
    return None if redis_server_installed() else MISSING


def _redis_facts(url: str | None) -> dict[str, Any]:
    if url is not None:
        return {"server": "given", "url": url}
    return {"server": "own", "version": redis_server_version(), "core": CORE_LOAD}


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # `kill` and Ctrl-C both unwind through the finally blocks that stop the servers.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench: interrupted; every server it started is stopped", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    began = time.monotonic()
    configurations = _select(args.only)
    plan = Plan(
        configurations=(),
        rounds=args.rounds or (1 if args.quick else 3),
        duration=args.duration or (2.0 if args.quick else 5.0),
        warmup=args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0),
        connections=args.connections,
    )
    if plan.rounds < 1 or plan.duration < 1 or plan.connections < 1:
        raise BenchError("--rounds, --duration and --connections must be at least 1")
    paced = args.paced if args.paced is not None else not args.quick
    profile = args.profile if args.profile is not None else not args.quick

    ensure_tools()
    require_two_cores()
    skipped: dict[str, str] = {}
    needs_redis = any(c.needs_redis for c in configurations)
    unusable = _redis_unusable(args.redis) if needs_redis else None
    if unusable is not None:
        for c in configurations:
            if c.needs_redis:
                skipped[c.name] = unusable
                print(f"bench: skipping {c.name}: {unusable}", file=sys.stderr)
        configurations = [c for c in configurations if not c.needs_redis]
        needs_redis = False
    if not configurations:
        raise BenchError("nothing left to measure")
    plan = Plan(tuple(configurations), plan.rounds, plan.duration, plan.warmup, plan.connections)
    load_at_start = load_average()
    if load_at_start > BUSY_LOAD:
        print(
            f"bench: load average is {load_at_start:g}: other work shares these cores, expect "
            "noisy absolute numbers (ratios within a round hold up better)",
            file=sys.stderr,
        )
    when = timestamp()
    print(
        f"{len(configurations)} configurations x {plan.rounds} round(s), {plan.duration:g} s "
        f"each after {plan.warmup:g} s warm-up, {plan.connections} connections",
        flush=True,
    )

    profile_summary: dict[str, Any] | None = None
    paced_rate: float | None = None
    with (
        tempfile.TemporaryDirectory(prefix="cityplane-bench-") as tmp,
        Supervisor(Path(tmp)) as supervisor,
    ):
        upstream_port = free_port()
        # gateway-full's issuer: a key of this run, its documents served by the upstream.
        issuer = create_issuer(issuer_url(upstream_port))
        issuer.write(supervisor.workdir)
        upstream = start_upstream(supervisor, upstream_port, core=CORE_LOAD)
        redis_url = args.redis
        if needs_redis and redis_url is None:
            redis_port = free_port()
            start_redis(supervisor, redis_port, core=CORE_LOAD)
            redis_url = local_url(redis_port)
        env = Environment(supervisor, upstream, upstream_port, redis_url, issuer)
        scripts = write_scripts(supervisor.workdir)
        campaign = Campaign(env, plan, scripts)
        campaign.saturation_rounds()
        saturation = summarize_phase(campaign.measurements, SATURATION)

        selected = {c.name for c in configurations}
        if paced and {DIRECT, GATEWAY_RATELIMIT} <= selected:
            gateway_rps = saturation[GATEWAY_RATELIMIT]["rps"]
            paced_rate = gateway_rps / 2
            campaign.paced_rounds(
                [c for c in configurations if c.name in PACED_CONFIGURATIONS], paced_rate
            )
        # The profile is of the configuration the throughput target is about, when it runs.
        profiled = GATEWAY_FULL if GATEWAY_FULL in selected else GATEWAY_RATELIMIT
        if profile and profiled in selected:
            port = free_port()
            # py-spy sees Python frames only: the profiled gateway runs the Python sources of
            # the modules the others run compiled (ADR 15), so its shares are of those.
            os.environ[NO_EXTENSIONS] = "1"
            try:
                gateway = BY_NAME[profiled].start(env, port)
            finally:
                del os.environ[NO_EXTENSIONS]
            assert gateway is not None
            print(f"\nprofiling {profiled} with py-spy (Python sources) ...", flush=True)
            load = Load(plan.connections, plan.duration)
            load = replace(load, headers=tuple(BY_NAME[profiled].request_headers(env).items()))
            try:
                profile_summary = record(
                    gateway,
                    port,
                    scripts[0],
                    load,
                    args.results,
                    seconds=plan.duration,
                )
            finally:
                supervisor.stop(gateway)
        routes: dict[str, Any] | None = None
        if args.routes:
            print("\nrouting at scale (bench/routes.py) ...", flush=True)
            routes = run_routes(supervisor, core=CORE_UNDER_TEST)
        measurements = campaign.measurements

    paced_summary = summarize_phase(measurements, PACED)
    derived = derive(measurements, paced_summary)
    result: dict[str, Any] = {
        "benchmark": "gateway",
        "date": when.isoformat(),
        **git_state(),
        "machine": machine(),
        "load_average_at_start": load_at_start,
        "plan": {
            "configurations": [c.name for c in configurations],
            "rounds": plan.rounds,
            "duration": plan.duration,
            "warmup": plan.warmup,
            "connections": plan.connections,
            "wrk_threads": 1,
        },
        "skipped": skipped,
        "redis": _redis_facts(args.redis) if needs_redis else None,
        "paced_rate": paced_rate,
        "summary": {SATURATION: saturation, PACED: paced_summary},
        "derived": derived,
        "targets": targets(derived),
        "profile": profile_summary,
        "routes": routes,
        "runs": [m.as_dict() for m in measurements],
        "runtime_s": round(time.monotonic() - began, 1),
    }
    print_summary(result)
    if profile_summary is not None:
        print_profile(profile_summary)
    if routes is not None:
        print_routes(routes)
    path = write_results(result, args.results)
    print(f"\nresults: {path} (and latest.json); commit {result['commit']}")
    print(f"gateway modules: {result['gateway_modules']}")
    print(f"total runtime: {result['runtime_s']:.0f} s")
    errors = sum(m.wrk.non_2xx + m.wrk.socket_errors for m in measurements)
    if errors:
        print(
            f"bench: {errors} requests failed (see '!!' above); those numbers do not hold",
            file=sys.stderr,
        )
        return 1
    return 0
