"""Identity hub benchmarks (issue #6): grants and logins per core, and what a token the gateway
has already seen costs it.

``python -m bench.identity`` (also run by ``python -m bench`` after the gateway table).
Method as in bench/README.md: the hub (`cityplane identity --demo`, SQLite) pinned to core 0,
the load generator to core 1, a fresh hub per run, every measurement once per round, rounds
interleaved, medians reported, every run kept in ``bench/results/identity-*.json``.

- ``client_credentials``: wrk POSTs the same RFC 6749 §4.4 request on every connection.
- ``refresh_token``: wrk with a pool of refresh tokens in Lua; each answer's rotated token
  (RFC 9700 §4.14.2) goes back into the pool, so no token is ever presented twice (a reuse
  would revoke its family) and the pool never runs dry while it holds more tokens than there
  are connections.
- ``password_login``: an aiohttp client (its own process) with one cookie jar per virtual
  person: GET /authorize, GET /login, POST /login with the right password, then a fresh jar.
  Logins/s is the hub's own ``verifications_total{method="pwd",outcome="ok"}`` over the
  measured window; latency is the POST's.
- ``token_validation``: the gateway's ``AuthPolicy.check`` on a cached hub token (timeit, the
  coroutine driven by hand as in tests/gateway/test_auth.py), and ``TokenVerifier.verify`` on
  tokens it has not seen, pinned to core 0 while the hub idles.

Keycloak's figures: "Concepts for sizing CPU and memory resources" (Keycloak high-availability
guide, 26.x): one vCPU per 15 password logins/s, per 120 client-credentials grants/s, per 120
refresh-token requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.identity_server import (
    PASSWORD,
    SERVICE_CLIENT,
    SERVICE_SCOPE,
    USERNAME,
    WEB_CLIENT,
    HubUnderTest,
    authorize_query,
    create_database,
    drop_database,
    form_fields,
    mint_refresh_tokens,
    pkce,
    register_clients,
    start_hub,
)
from bench.processes import (
    CORE_LOAD,
    CORE_UNDER_TEST,
    BenchError,
    Supervisor,
    core_busy,
    core_times,
    free_port,
    group_cpu_seconds,
)
from bench.tools import REPO, ensure_tools, git_state, load_average, machine, timestamp
from bench.wrk import Load, run_wrk, write_scripts

CLIENT_CREDENTIALS = "client_credentials"
REFRESH_TOKEN = "refresh_token"
PASSWORD_LOGIN = "password_login"
TOKEN_VALIDATION = "token_validation"
KINDS = (CLIENT_CREDENTIALS, REFRESH_TOKEN, PASSWORD_LOGIN)
# Issue #6: per core (the hub pinned to one); the validation target is µs per request.
TARGETS = {CLIENT_CREDENTIALS: 1000.0, REFRESH_TOKEN: 500.0, PASSWORD_LOGIN: 15.0}
KEYCLOAK_PER_VCPU = {CLIENT_CREDENTIALS: 120.0, REFRESH_TOKEN: 120.0, PASSWORD_LOGIN: 15.0}
VALIDATION_TARGET_US = 50.0
RESULTS = REPO / "bench" / "results"
# Refresh tokens in the pool beyond one per connection: a failed answer loses its token.
POOL_MARGIN = 32

_CLIENT_CREDENTIALS_LUA = """
wrk.method = "POST"
wrk.path = "/token"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Authorization"] = "AUTH"
wrk.body = "grant_type=client_credentials&scope=SCOPE"
"""

_REFRESH_LUA = """
local pool = {TOKENS}
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Authorization"] = "AUTH"
request = function()
  local token = table.remove(pool) or "pool-exhausted"
  return wrk.format("POST", "/token", nil, "grant_type=refresh_token&refresh_token=" .. token)
end
response = function(status, headers, body)
  local token = body:match('"refresh_token":%s*"([^"]+)"')
  if token then table.insert(pool, token) end
end
"""


@dataclass
class Run:
    """One measured run of one kind."""

    kind: str
    round: int
    rps: float
    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_util: float | None  # the hub's CPU time (all its threads) / wall time; 1.0 = one core
    cpu_us_per_request: float | None
    load_average: float
    core_busy: list[float]
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def per_cpu_second(self) -> float | None:
        """Requests per CPU-second of the hub: its capacity per core, whatever else ran."""
        return round(self.rps / self.cpu_util, 1) if self.cpu_util else None


# --- the measurements -----------------------------------------------------------------------


def _hub_cpu(hub: HubUnderTest) -> float:
    user, system = group_cpu_seconds(hub.process.pid)
    return user + system


def _lua(workdir: Path, name: str, prefix: str) -> Path:
    """``prefix`` + the gateway benchmark's JSON summary hook (bench/wrk.py)."""
    summary, _ = write_scripts(workdir)
    path = workdir / f"{name}.lua"
    path.write_text(prefix + summary.read_text())
    return path


def measure_wrk(
    hub: HubUnderTest, kind: str, load: Load, warmup: float, workdir: Path, round_: int
) -> Run:
    auth = hub.basic(SERVICE_CLIENT if kind == CLIENT_CREDENTIALS else WEB_CLIENT)
    if kind == CLIENT_CREDENTIALS:
        prefix = _CLIENT_CREDENTIALS_LUA.replace("SCOPE", SERVICE_SCOPE.replace(":", "%3A"))
    else:
        # Warm-up and measured run are two wrk processes, so each gets tokens of its own.
        grants = asyncio.run(mint_refresh_tokens(hub, 2 * (load.connections + POOL_MARGIN)))
        half = len(grants.refresh_tokens) // 2
        pools = [grants.refresh_tokens[:half], grants.refresh_tokens[half:]]
    if warmup > 0:
        if kind == REFRESH_TOKEN:
            prefix = _REFRESH_LUA.replace("TOKENS", ",".join(f'"{t}"' for t in pools[0]))
        script = _lua(workdir, kind, prefix.replace("AUTH", auth))
        run_wrk(Load(load.connections, warmup), hub.port, script, core=CORE_LOAD)
    if kind == REFRESH_TOKEN:
        prefix = _REFRESH_LUA.replace("TOKENS", ",".join(f'"{t}"' for t in pools[1]))
    script = _lua(workdir, kind, prefix.replace("AUTH", auth))
    cpu_before, cores_before, load_before = _hub_cpu(hub), core_times(), load_average()
    result = run_wrk(load, hub.port, script, core=CORE_LOAD)
    cores, cpu = core_busy(cores_before, core_times()), _hub_cpu(hub) - cpu_before
    return Run(
        kind=kind,
        round=round_,
        rps=result.rps,
        requests=result.requests,
        duration_s=result.duration_s,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        errors=result.non_2xx + result.socket_errors,
        cpu_util=round(cpu / result.duration_s, 3) if result.duration_s else None,
        cpu_us_per_request=round(cpu * 1e6 / max(result.requests, 1), 1),
        load_average=max(load_before, load_average()),
        core_busy=cores,
        notes={"connections": load.connections},
    )


def measure_logins(
    hub: HubUnderTest, duration: float, warmup: float, users: int, round_: int
) -> Run:
    """The login load in its own process on the load core (see `login_load`)."""
    argv = [
        "taskset",
        "-c",
        str(CORE_LOAD),
        sys.executable,
        "-m",
        "bench.identity",
        "logins",
        "--issuer",
        hub.issuer,
        "--hub-pid",
        str(hub.process.pid),
        "--users",
        str(users),
        "--duration",
        str(duration),
        "--warmup",
        str(warmup),
    ]
    cores_before, load_before = core_times(), load_average()
    data = _child_json(argv, timeout=duration + warmup + 60)
    return Run(
        kind=PASSWORD_LOGIN,
        round=round_,
        rps=data["rps"],
        requests=data["logins"],
        duration_s=data["duration_s"],
        p50_ms=data["p50_ms"],
        p99_ms=data["p99_ms"],
        errors=data["errors"],
        cpu_util=data["cpu_util"],
        cpu_us_per_request=data["cpu_us_per_login"],
        load_average=max(load_before, load_average()),
        core_busy=core_busy(cores_before, core_times()),
        notes={"users": users, "posts_completed": data["posts_completed"]},
    )


def measure_validation(hub: HubUnderTest, workdir: Path, round_: int, calls: int) -> Run:
    """The gateway's cost for a hub token, in a process on the hub's core while it idles."""
    grants = asyncio.run(mint_refresh_tokens(hub, 50))
    tokens = workdir / "access-tokens.json"
    tokens.write_text(json.dumps(grants.access_tokens))
    argv = ["taskset", "-c", str(CORE_UNDER_TEST), sys.executable, "-m", "bench.identity"]
    argv += ["validation", "--issuer", hub.issuer, "--tokens", str(tokens), "--calls", str(calls)]
    cores_before, load_before = core_times(), load_average()
    data = _child_json(argv, timeout=120)
    return Run(
        kind=TOKEN_VALIDATION,
        round=round_,
        rps=round(1e6 / data["cached_us"], 1),
        requests=data["calls"],
        duration_s=0.0,
        p50_ms=data["cached_us"] / 1000,
        p99_ms=data["cached_us"] / 1000,
        errors=0,
        cpu_util=None,
        cpu_us_per_request=data["cached_us"],
        load_average=max(load_before, load_average()),
        core_busy=core_busy(cores_before, core_times()),
        notes={"first_sight_us": data["first_sight_us"]},
    )


def _child_json(argv: list[str], *, timeout: float) -> dict[str, Any]:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"did not finish: {' '.join(argv)}") from None
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv[3:7])} failed:\n{done.stderr.strip()[-2000:]}")
    data: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return data


# --- the child processes: login load and the gateway's token check ----------------------------


async def _ok_logins(http: aiohttp.ClientSession, issuer: str) -> tuple[float, float]:
    """(successful, failed) password verifications so far, from the hub's /metrics."""
    async with http.get(f"{issuer}/metrics") as r:
        text = await r.text()
    counts = {"ok": 0.0, "failed": 0.0}
    for line in text.splitlines():
        if line.startswith('cityplane_identity_verifications_total{method="pwd"'):
            for outcome in counts:
                if f'outcome="{outcome}"' in line:
                    counts[outcome] = float(line.rsplit(" ", 1)[1])
    return counts["ok"], counts["failed"]


async def login_load(
    issuer: str, hub_pid: int, users: int, duration: float, warmup: float
) -> dict[str, Any]:
    """``users`` people signing in over and over, each sign-in in a fresh session."""
    posts: list[tuple[float, float]] = []  # (finished at, seconds) of each POST /login
    errors = 0
    stop_at = time.monotonic() + warmup + duration

    async def person() -> None:
        nonlocal errors
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            while time.monotonic() < stop_at:
                jar.clear()  # a new browser: the password page is asked for again
                _, challenge = pkce()
                url = f"{issuer}/authorize?{authorize_query(challenge)}"
                async with http.get(url, allow_redirects=False) as r:
                    location = r.headers.get("Location", "")
                async with http.get(issuer + location, allow_redirects=False) as r:
                    page = await r.text()
                form = form_fields(page)
                form.update(username=USERNAME, password=PASSWORD)
                began = time.monotonic()
                async with http.post(f"{issuer}/login", data=form, allow_redirects=False) as r:
                    await r.read()
                    if r.status != 303:
                        errors += 1
                        continue
                finished = time.monotonic()
                posts.append((finished, finished - began))

    async with aiohttp.ClientSession() as probe:
        people = [asyncio.create_task(person()) for _ in range(users)]
        await asyncio.sleep(warmup)
        ok0, failed0 = await _ok_logins(probe, issuer)
        cpu0, t0 = sum(group_cpu_seconds(hub_pid)), time.monotonic()
        await asyncio.sleep(duration)
        ok1, failed1 = await _ok_logins(probe, issuer)
        cpu1, t1 = sum(group_cpu_seconds(hub_pid)), time.monotonic()
        await asyncio.gather(*people)
    window = sorted(seconds for at, seconds in posts if t0 <= at <= t1) or [0.0]
    logins = int(ok1 - ok0)
    return {
        "logins": logins,
        "posts_completed": len(window),
        "duration_s": round(t1 - t0, 3),
        "rps": round(logins / (t1 - t0), 2),
        "p50_ms": round(1000 * _percentile(window, 50), 1),
        "p99_ms": round(1000 * _percentile(window, 99), 1),
        "errors": errors + int(failed1 - failed0),
        "cpu_util": round((cpu1 - cpu0) / (t1 - t0), 3),
        "cpu_us_per_login": round((cpu1 - cpu0) * 1e6 / max(logins, 1), 1),
    }


def _percentile(sorted_values: list[float], pct: float) -> float:
    index = min(len(sorted_values) - 1, round(pct / 100 * (len(sorted_values) - 1)))
    return sorted_values[index]


async def validation_cost(issuer: str, tokens: list[str], number: int) -> dict[str, Any]:
    """µs per `AuthPolicy.check` on a cached token, and per first `verify` of a new one."""
    from cityplane.schema import Auth
    from gateway.exchange import Exchange
    from gateway.h1server import detached_request
    from gateway.jwks import TokenVerifier
    from gateway.policies.auth import AuthPolicy

    verifier = TokenVerifier(issuer, audience=WEB_CLIENT)
    await verifier.start()
    try:
        began = time.perf_counter()
        for token in tokens:
            await verifier.verify(token)
        first_sight_us = (time.perf_counter() - began) * 1e6 / len(tokens)
        policy = AuthPolicy("bench/read", Auth(scopes=[SERVICE_SCOPE], minTrustLevel=1), verifier)
        request = detached_request("GET", "/x", {"Authorization": f"Bearer {tokens[0]}"})
        exchange = Exchange(
            request, client_ip="127.0.0.1", path="/x", route_id="r", request_id="1", start=0.0
        )

        def check() -> None:
            exchange.upstream_block = b""
            coro = policy.check(exchange)
            try:
                coro.send(None)
            except StopIteration:
                return
            raise BenchError("a cached token waited for something")

        check()
        if exchange.consumer != WEB_CLIENT:
            raise BenchError(f"the policy did not accept the hub's token ({exchange.consumer!r})")
        best = min(timeit.repeat(check, number=number, repeat=5)) / number
    finally:
        await verifier.close()
    return {
        "cached_us": round(best * 1e6, 3),
        "first_sight_us": round(first_sight_us, 1),
        "calls": number,
    }


# --- rounds, table, results ------------------------------------------------------------------


@dataclass(frozen=True)
class IdentityPlan:
    rounds: int
    duration: float
    warmup: float
    connections: int
    users: int
    validation_calls: int
    postgres: str | None = None  # server DSN: a fresh database per hub instead of SQLite


def run_kind(
    supervisor: Supervisor, workdir: Path, kind: str, plan: IdentityPlan, round_: int
) -> list[Run]:
    """A fresh hub, the benchmark's clients, one measurement; the hub is stopped after."""
    port = free_port()
    data_dir = Path(tempfile.mkdtemp(prefix=f"hub-{kind}-", dir=workdir))
    url = asyncio.run(create_database(plan.postgres)) if plan.postgres else None
    try:
        hub = HubUnderTest(start_hub(supervisor, port, data_dir, url), port, data_dir)
    except BaseException:
        if plan.postgres and url:
            asyncio.run(drop_database(plan.postgres, url))
        raise
    try:
        asyncio.run(register_clients(hub))
        if kind == PASSWORD_LOGIN:
            return [measure_logins(hub, plan.duration, plan.warmup, plan.users, round_)]
        load = Load(plan.connections, plan.duration)
        runs = [measure_wrk(hub, kind, load, plan.warmup, workdir, round_)]
        if kind == REFRESH_TOKEN:  # the hub idles now: its core is free for the gateway's check
            runs.append(measure_validation(hub, workdir, round_, plan.validation_calls))
        return runs
    finally:
        supervisor.stop(hub.process)
        if plan.postgres and url:
            asyncio.run(drop_database(plan.postgres, url))


def _progress(run: Run, rounds: int) -> None:
    if run.kind == TOKEN_VALIDATION:
        print(
            f"  round {run.round}/{rounds}  {run.kind:<18} cached {run.cpu_us_per_request:.2f} µs"
            f"  first sight {run.notes['first_sight_us']:.0f} µs",
            flush=True,
        )
        return
    cpu = f"hub cpu {run.cpu_util:4.0%}" if run.cpu_util is not None else ""
    cores = "cores " + "/".join(f"{b:.0%}" for b in run.core_busy)
    flag = f"  !! {run.errors} failed" if run.errors else ""
    print(
        f"  round {run.round}/{rounds}  {run.kind:<18} {run.rps:>8,.1f} /s"
        f"  p50 {run.p50_ms:7.2f} ms  p99 {run.p99_ms:7.2f} ms  {cpu}  {cores}"
        f"  load {run.load_average:g}{flag}",
        flush=True,
    )


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def summarize(runs: list[Run]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for kind in (*KINDS, TOKEN_VALIDATION):
        mine = [r for r in runs if r.kind == kind]
        if not mine:
            continue
        entry: dict[str, Any] = {
            "runs": len(mine),
            "rps": _median([r.rps for r in mine]),
            "rps_min": min(r.rps for r in mine),
            "rps_max": max(r.rps for r in mine),
            "p50_ms": _median([r.p50_ms for r in mine]),
            "p99_ms": _median([r.p99_ms for r in mine]),
            "cpu_util": _median([r.cpu_util for r in mine]),
            "per_cpu_second": _median([r.per_cpu_second for r in mine]),
            "cpu_us_per_request": _median([r.cpu_us_per_request for r in mine]),
            "errors": sum(r.errors for r in mine),
        }
        if kind in TARGETS:
            entry["target"] = TARGETS[kind]
            entry["ratio_to_target"] = round(entry["rps"] / TARGETS[kind], 2)
            entry["keycloak_per_vcpu"] = KEYCLOAK_PER_VCPU[kind]
            entry["ratio_to_keycloak"] = round(entry["rps"] / KEYCLOAK_PER_VCPU[kind], 2)
        else:
            entry["first_sight_us"] = _median([r.notes["first_sight_us"] for r in mine])
            entry["target_us"] = VALIDATION_TARGET_US
        summary[kind] = entry
    return summary


def print_table(summary: dict[str, dict[str, Any]]) -> None:
    print(
        "\nidentity hub (one pinned core; medians)\n"
        f"{'measurement':<20} {'per s':>9} {'p50 ms':>8} {'p99 ms':>8} {'hub cpu':>8}"
        f" {'per cpu-s':>10} {'target':>7} {'x target':>9} {'Keycloak':>9} {'x KC':>6}"
    )
    for kind in KINDS:
        s = summary.get(kind)
        if s is None:
            continue
        cpu = f"{s['cpu_util']:.0%}" if s["cpu_util"] is not None else "-"
        per_cpu = f"{s['per_cpu_second']:,.0f}" if s["per_cpu_second"] else "-"
        flag = "  !!" if s["errors"] else ""
        print(
            f"{kind:<20} {s['rps']:>9,.1f} {s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f} {cpu:>8}"
            f" {per_cpu:>10} {s['target']:>7,.0f} {s['ratio_to_target']:>9.2f}"
            f" {s['keycloak_per_vcpu']:>9,.0f} {s['ratio_to_keycloak']:>6.1f}{flag}"
        )
    v = summary.get(TOKEN_VALIDATION)
    if v is not None:
        print(
            f"gateway token check: {v['cpu_us_per_request']:.2f} µs per request on a cached token"
            f" (target ≤ {VALIDATION_TARGET_US:g} µs); first sight {v['first_sight_us']:.0f} µs"
        )


def run(args: argparse.Namespace) -> int:
    began = time.monotonic()
    plan = IdentityPlan(
        rounds=args.rounds or (1 if args.quick else 3),
        duration=args.duration or (2.0 if args.quick else 5.0),
        warmup=args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0),
        connections=args.connections,
        users=args.users,
        validation_calls=2_000 if args.quick else 20_000,
        postgres=args.postgres,
    )
    kinds = [k for k in KINDS if not args.only or k in args.only]
    ensure_tools()
    load_at_start = load_average()
    when = timestamp()
    print(
        f"\nidentity hub: {len(kinds)} measurements x {plan.rounds} round(s), "
        f"{plan.duration:g} s each after {plan.warmup:g} s warm-up; "
        f"{'PostgreSQL' if plan.postgres else 'SQLite'}; load average {load_at_start:g}",
        flush=True,
    )
    runs: list[Run] = []
    with (
        tempfile.TemporaryDirectory(prefix="cityplane-bench-identity-") as tmp,
        Supervisor(Path(tmp)) as supervisor,
    ):
        for round_ in range(1, plan.rounds + 1):
            for kind in kinds:
                for measured in run_kind(supervisor, Path(tmp), kind, plan, round_):
                    runs.append(measured)
                    _progress(measured, plan.rounds)
    summary = summarize(runs)
    result = {
        "benchmark": "identity",
        "date": when.isoformat(),
        **git_state(),
        # The hub is the code under test here: uncommitted changes to it qualify the commit.
        "identity_dirty_files": _dirty("identity"),
        "machine": machine(),
        "load_average_at_start": load_at_start,
        "plan": asdict(plan),
        "summary": summary,
        "runs": [{**asdict(r), "per_cpu_second": r.per_cpu_second} for r in runs],
        "runtime_s": round(time.monotonic() - began, 1),
    }
    print_table(summary)
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"identity-{when.strftime('%Y%m%dT%H%M%SZ')}.json"
    text = json.dumps(result, indent=2) + "\n"
    path.write_text(text)
    (args.results / "identity-latest.json").write_text(text)
    print(f"results: {path}; identity runtime {result['runtime_s']:.0f} s")
    if any(r.errors for r in runs):
        print("bench: some grants or logins failed (see '!!'); those numbers do not hold")
        return 1
    return 0


def _dirty(*paths: str) -> list[str]:
    done = subprocess.run(
        ["git", "status", "--porcelain", "--", *paths],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    # Porcelain lines are "XY path": the leading status column may be a space.
    return [line[3:] for line in done.stdout.splitlines() if len(line) > 3]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.identity", description="Benchmark the CityPlane identity hub."
    )
    p.add_argument("--quick", action="store_true", help="smoke check: 1 round of 2 s runs")
    p.add_argument("--rounds", type=int, help="rounds (default 3)")
    p.add_argument("--duration", type=float, help="seconds per measured run (default 5)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per run (default 2)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--users", type=int, default=8, help="people signing in at once (default 8)")
    p.add_argument("--only", nargs="+", choices=KINDS, help="measure only these")
    p.add_argument(
        "--postgres",
        metavar="DSN",
        help="PostgreSQL server (postgresql://postgres@127.0.0.1:5432/postgres): each hub gets "
        "a fresh database there instead of SQLite",
    )
    p.add_argument("--results", type=Path, default=RESULTS, help="directory for the JSON files")
    sub = p.add_subparsers(dest="child", help=argparse.SUPPRESS)
    logins = sub.add_parser("logins")  # the login load, run by measure_logins
    logins.add_argument("--issuer", required=True)
    logins.add_argument("--hub-pid", type=int, required=True)
    logins.add_argument("--users", type=int, default=8)
    logins.add_argument("--duration", type=float, default=5.0)
    logins.add_argument("--warmup", type=float, default=2.0)
    validation = sub.add_parser("validation")  # the gateway's check, run by measure_validation
    validation.add_argument("--issuer", required=True)
    validation.add_argument("--tokens", type=Path, required=True)
    validation.add_argument("--calls", type=int, default=20_000)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.child == "logins":
            load = login_load(args.issuer, args.hub_pid, args.users, args.duration, args.warmup)
            print(json.dumps(asyncio.run(load)))
            return 0
        if args.child == "validation":
            tokens = json.loads(args.tokens.read_text())
            print(json.dumps(asyncio.run(validation_cost(args.issuer, tokens, args.calls))))
            return 0
        return run(args)
    except BenchError as exc:
        print(f"bench.identity: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench.identity: interrupted; every hub it started is stopped", file=sys.stderr)
        return 130


def after_gateway(status: int, argv: Sequence[str] | None = None) -> int:
    """`python -m bench`: the identity table follows the gateway's, unless the gateway run was
    interrupted or narrowed with --only (then only what was asked for runs). --quick and
    --results carry over; the other options are the gateway's."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if status == 130 or any(a == "--only" or a.startswith("--only=") for a in argv):
        return status
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--quick", action="store_true")
    shared.add_argument("--results", type=Path, default=RESULTS)
    known, _ = shared.parse_known_args(argv)
    own = ["--results", str(known.results), *(["--quick"] if known.quick else [])]
    return max(status, main(own))


if __name__ == "__main__":
    raise SystemExit(main())
