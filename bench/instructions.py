"""Instructions per request (callgrind): the gateway's cost in a unit this VM cannot disturb.

``python -m bench.instructions`` (about 4 minutes; not part of ``python -m bench``).

req/s on this shared 2-core VM moves by 15 % within an hour and by 2 to 3 times across days
(docs/perf.md), so an A/B of a few per cent cannot be read from it. ``valgrind
--tool=callgrind`` counts the instructions the gateway process executes in user space, which is
the same to within 1 % from one run to the next whatever else the machine does. It says nothing
about the kernel's share (the sockets) or about cache misses: req/s in ``python -m bench``
stays the issue's measure, this is the check that a change made the gateway's own work smaller.

- Each configuration of :mod:`bench.gateway` (the same documents as ``python -m bench``) runs in
  ``cityplane gateway --workers 1`` under callgrind with instrumentation off; after it answers,
  ``--warmup`` requests fill its caches and pools; ``callgrind_control -i on``; ``--requests``
  GETs over 8 keep-alive connections; ``-i off``. Instructions / requests is the figure.
- ``gateway-redis``'s figure depends on how many decisions share one EVALSHA: ~2 here (8
  connections, a gateway slowed down ~50 times), ~21 under ``python -m bench``'s wrk (64
  connections). Its difference to ``gateway-ratelimit`` is an upper bound of the Redis path's
  own work.
- Twice per configuration: the compiled modules (``make build``, ADR 15/16) and the Python
  sources (``CITYPLANE_NO_EXTENSIONS=1``), so the table shows what compiling saves.

Results: ``bench/results/instructions-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.gateway import CITYPLANE, service_document
from bench.issuer import BenchIssuer, create_issuer, issuer_url
from bench.nginx import start_upstream
from bench.processes import (
    CORE_LOAD,
    CORE_UNDER_TEST,
    BenchError,
    Supervisor,
    free_port,
    wait_until_answers,
)
from bench.redis_server import local_url, redis_server_installed, start_redis
from bench.tools import git_state, machine

CONFIGURATIONS = (
    "gateway",
    "gateway-ratelimit",
    "gateway-accesslog",
    "gateway-redis",
    "gateway-full",
)
LOGGING = ("gateway-accesslog", "gateway-full")
FORMS = {"compiled": {}, "sources": {"CITYPLANE_NO_EXTENSIONS": "1"}}
CONNECTIONS = 8


def _argv(
    name: str, port: int, config: Path, workdir: Path, issuer: BenchIssuer, redis: str
) -> list[str]:
    argv = [
        str(CITYPLANE),
        *("--log-level", "warning", "gateway", "--config", str(config)),
        *("--port", str(port), "--status-port", str(free_port()), "--workers", "1"),
        "--access-log",
        str(workdir / f"access-{port}.log") if name in LOGGING else "off",
    ]
    if name == "gateway-redis":
        # Under callgrind the gateway runs ~50 times slower: 0.25 s would time Redis out.
        argv += ["--redis", redis, "--redis-timeout", "30"]
    if name == "gateway-full":
        argv += ["--issuer", issuer.url, "--audience", issuer.audience]
    return argv


def _load(port: int, requests: int, headers: dict[str, str]) -> None:
    """``requests`` GETs over `CONNECTIONS` keep-alive connections; every answer must be 200."""
    failures: list[str] = []

    def one(count: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            for i in range(count):
                conn.request("GET", f"/bench/items/{i}", headers=headers)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    failures.append(f"HTTP {response.status}")
                    return
        except (OSError, http.client.HTTPException) as exc:
            failures.append(repr(exc))
        finally:
            conn.close()

    threads = [
        threading.Thread(target=one, args=(requests // CONNECTIONS,)) for _ in range(CONNECTIONS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise BenchError(f"the gateway under callgrind failed a request: {failures[0]}")


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, check=True)


def _total(out: Path) -> int:
    total = 0
    for path in out.parent.glob(out.name + "*"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    return total


def measure(
    name: str,
    form: str,
    *,
    supervisor: Supervisor,
    upstream_port: int,
    issuer: BenchIssuer,
    redis: str,
    requests: int,
    warmup: int,
) -> dict[str, Any]:
    workdir = supervisor.workdir
    port = free_port()
    config = workdir / f"{name}-{form}.json"
    document = service_document(
        upstream_port,
        rate_limit=name not in ("gateway", "gateway-accesslog"),
        auth_scope=issuer.scope if name == "gateway-full" else None,
    )
    config.write_text(json.dumps(document))
    out = workdir / f"callgrind-{name}-{form}.out"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    saved = {k: os.environ.get(k) for k in FORMS["sources"]}
    os.environ.update(FORMS[form])
    try:
        started = supervisor.start(
            f"{name}-{form}",
            valgrind + _argv(name, port, config, workdir, issuer, redis),
            core=CORE_UNDER_TEST,
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    headers = {"Authorization": issuer.authorization} if name == "gateway-full" else {}
    wait_until_answers(started, port, headers=headers, timeout=180.0)
    _load(port, warmup, headers)
    _control(started.proc.pid, "-i", "on")
    began = time.monotonic()
    _load(port, requests, headers)
    seconds = time.monotonic() - began
    _control(started.proc.pid, "-i", "off")
    supervisor.stop(started, timeout=60.0)
    done = requests // CONNECTIONS * CONNECTIONS
    total = _total(out)
    if total == 0:
        raise BenchError(f"callgrind counted nothing for {name} ({form}): {started.output_tail()}")
    return {
        "file": max(out.parent.glob(out.name + "*")),
        "configuration": name,
        "form": form,
        "requests": done,
        "instructions": total,
        "per_request": round(total / done),
        "seconds": round(seconds, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--only", default=",".join(CONFIGURATIONS), help="configurations")
    parser.add_argument("--forms", default=",".join(FORMS), help="compiled,sources")
    parser.add_argument("--requests", type=int, default=2_000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--keep", action="store_true", help="keep the callgrind files (for callgrind_annotate)"
    )
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    forms = [f for f in args.forms.split(",") if f]
    unknown = [n for n in names if n not in CONFIGURATIONS] + [f for f in forms if f not in FORMS]
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)}")
    for tool in ("valgrind", "callgrind_control", "nginx"):
        if shutil.which(tool) is None:
            print(f"bench.instructions: {tool} is not installed", file=sys.stderr)
            return 1
    if "gateway-redis" in names and not redis_server_installed():
        print("bench.instructions: no redis-server: gateway-redis skipped", file=sys.stderr)
        names.remove("gateway-redis")
    rows: list[dict[str, Any]] = []
    began = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="cityplane-instructions-") as tmp:
            workdir = Path(tmp)
            with Supervisor(workdir) as supervisor:
                upstream_port = free_port()
                issuer = create_issuer(issuer_url(upstream_port))
                issuer.write(workdir)
                start_upstream(supervisor, upstream_port, core=CORE_LOAD)
                redis = ""
                if "gateway-redis" in names:
                    redis_port = free_port()
                    start_redis(supervisor, redis_port, core=CORE_LOAD)
                    redis = local_url(redis_port)
                for name in names:
                    for form in forms:
                        row = measure(
                            name,
                            form,
                            supervisor=supervisor,
                            upstream_port=upstream_port,
                            issuer=issuer,
                            redis=redis,
                            requests=args.requests,
                            warmup=args.warmup,
                        )
                        rows.append(row)
                        if args.keep:
                            args.results.mkdir(parents=True, exist_ok=True)
                            kept = args.results / f"callgrind-{name}-{form}.out"
                            shutil.copy(row.pop("file"), kept)
                            row["callgrind_file"] = str(kept)
                        else:
                            row.pop("file")
                        print(
                            f"  {name:<18} {form:<9} {row['per_request']:>9,} instructions "
                            f"per request ({row['requests']:,} requests, {row['seconds']} s)",
                            flush=True,
                        )
    except BenchError as exc:
        print(f"bench.instructions: {exc}", file=sys.stderr)
        return 1
    print()
    print(f"{'configuration':<18} {'compiled':>10} {'sources':>10} {'compiled/sources':>17}")
    for name in names:
        got = {r["form"]: r["per_request"] for r in rows if r["configuration"] == name}
        both = {"compiled", "sources"} <= set(got)
        ratio = f"{got['compiled'] / got['sources']:.3f}" if both else "-"
        cells = [f"{got[f]:>10,}" if f in got else f"{'-':>10}" for f in ("compiled", "sources")]
        print(f"{name:<18} {' '.join(cells)} {ratio:>17}")
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H%M%S+0000", time.gmtime())
    path = args.results / f"instructions-{stamp}.json"
    record = {**git_state(), "machine": machine(), "connections": CONNECTIONS, "rows": rows}
    path.write_text(json.dumps(record, indent=2))
    print(f"\nresults: {path}; {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
