"""``--workers`` scaling (issue #6): req/s with 1 and 2 gateway workers, short runs.

``python -m bench.workers`` (about a minute). This machine has two cores, so two workers can
only be measured with wrk and the upstream on the same two cores: that run says how the
gateway shares a saturated machine, not how it scales on cores of its own. For that reason
there are three setups, interleaved in each round:

- ``1 worker, pinned``: the main benchmark's setup (gateway on core 0, wrk + upstream on 1);
- ``1 worker, shared``: nothing pinned, everything on both cores;
- ``2 workers, shared``: nothing pinned, everything on both cores.

``usr+sys us/req`` is the CPU time of the gateway's process group (supervisor and workers)
per request: if it stays flat from one worker to two, the workers add no overhead of their
own, and req/s on cores of their own would grow with them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.gateway import service_document
from bench.nginx import start_upstream
from bench.processes import (
    CORE_LOAD,
    CORE_UNDER_TEST,
    BenchError,
    Supervisor,
    free_port,
    group_cpu_seconds,
    wait_until_answers,
)
from bench.tools import ensure_tools, git_state, load_average, require_two_cores, timestamp
from bench.wrk import Load, run_wrk, write_scripts

CITYPLANE = Path(sys.executable).parent / "cityplane"
BOTH = "0,1"
# name, workers, core of the gateway, core of wrk and the upstream
SETUPS = (
    ("1 worker, pinned", 1, str(CORE_UNDER_TEST), str(CORE_LOAD)),
    ("1 worker, shared", 1, BOTH, BOTH),
    ("2 workers, shared", 2, BOTH, BOTH),
)


def measure(
    supervisor: Supervisor,
    config: Path,
    script: Path,
    setup: tuple[str, int, str, str],
    *,
    duration: float,
) -> dict[str, Any]:
    name, workers, gateway_cores, load_cores = setup
    port = free_port()
    argv = [
        str(CITYPLANE), "--log-level", "warning", "gateway", "--config", str(config),
        "--port", str(port), "--status-port", str(free_port()), "--access-log", "off",
        "--workers", str(workers),
    ]  # fmt: skip
    gateway = supervisor.start(name, argv, core=gateway_cores)
    try:
        wait_until_answers(gateway, port)
        run_wrk(Load(64, 1), port, script, core=load_cores)
        user0, sys0 = group_cpu_seconds(gateway.pid)
        result = run_wrk(Load(64, duration), port, script, core=load_cores)
        user1, sys1 = group_cpu_seconds(gateway.pid)
    finally:
        supervisor.stop(gateway)
    requests = result.requests or 1
    return {
        "setup": name,
        "rps": round(result.rps),
        "usr_us": round((user1 - user0) * 1e6 / requests, 1),
        "sys_us": round((sys1 - sys0) * 1e6 / requests, 1),
        "p99_ms": result.p99_ms,
        "errors": result.non_2xx + result.socket_errors,
    }


def run(rounds: int, duration: float) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="cityplane-workers-") as tmp,
        Supervisor(Path(tmp)) as supervisor,
    ):
        upstream_port = free_port()
        start_upstream(supervisor, upstream_port, core=CORE_LOAD)
        script = write_scripts(supervisor.workdir)[0]
        config = supervisor.workdir / "gateway.json"
        config.write_text(json.dumps(service_document(upstream_port, rate_limit=False)))
        for round_ in range(1, rounds + 1):
            for setup in SETUPS:
                m = measure(supervisor, config, script, setup, duration=duration)
                m["round"] = round_
                runs.append(m)
                print(
                    f"  round {round_}: {m['setup']:<18} {m['rps']:>7} req/s  "
                    f"{m['usr_us']:.1f} + {m['sys_us']:.1f} us/req",
                    flush=True,
                )
    summary = {}
    for name, *_ in SETUPS:
        mine = [r for r in runs if r["setup"] == name]
        summary[name] = {
            key: statistics.median(r[key] for r in mine) for key in ("rps", "usr_us", "sys_us")
        }
    return {"runs": runs, "summary": summary}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per run (default 3)")
    p.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    began = time.monotonic()
    try:
        ensure_tools()
        require_two_cores()
        result = run(args.rounds, args.duration)
    except BenchError as exc:
        print(f"bench.workers: {exc}", file=sys.stderr)
        return 1
    base = result["summary"]["1 worker, shared"]["rps"]
    print("\nmedians (req/s; ratio to 1 worker on the same shared cores; CPU us per request)")
    for name, s in result["summary"].items():
        print(
            f"{name:<18} {s['rps']:>7.0f}  {s['rps'] / base:4.2f}  "
            f"{s['usr_us']:.1f} + {s['sys_us']:.1f}"
        )
    out = {
        "benchmark": "workers",
        "date": timestamp().isoformat(),
        **git_state(),
        "load_average": load_average(),
        **result,
        "runtime_s": round(time.monotonic() - began, 1),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"workers-{out['date'].replace(':', '')}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"results: {path}; commit {out['commit']}")
    return 1 if any(r["errors"] for r in result["runs"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
