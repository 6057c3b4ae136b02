"""Rounds of measurements: every configuration once per round, rounds interleaved.

Interleaving spreads slow drifts of a shared machine (other work, thermal, the page cache)
over all configurations instead of charging them to whichever ran last. Each measurement
starts its own server, warms it up, measures, and stops it, so no run inherits the state
(pools, counters, a long access log) of another.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.configurations import DIRECT, Configuration, Environment
from bench.processes import CORE_LOAD, core_busy, core_times, free_port, group_cpu_seconds
from bench.tools import load_average
from bench.wrk import Load, WrkResult, run_wrk

SATURATION = "saturation"
PACED = "paced"


@dataclass(frozen=True)
class Plan:
    configurations: tuple[Configuration, ...]
    rounds: int
    duration: float
    warmup: float
    connections: int


@dataclass(frozen=True)
class Measurement:
    configuration: str
    phase: str
    round: int
    wrk: WrkResult
    connections: int
    cpu_util: float | None  # CPU time of the process under test / wall time (1.0 = one core)
    # CPU microseconds per request of the process under test, in user space and in the kernel.
    user_us: float | None
    system_us: float | None
    load_average: float
    core_busy: list[float]  # every core's busy share during the run, whoever used it
    delay_ms: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def rps_per_cpu(self) -> float | None:
        """Requests per CPU-second of the process under test: its cost, whatever else runs."""
        if not self.cpu_util:
            return None
        return round(self.wrk.rps / self.cpu_util, 1)

    def as_dict(self) -> dict[str, Any]:
        return {
            "configuration": self.configuration,
            "phase": self.phase,
            "round": self.round,
            "connections": self.connections,
            "delay_ms": self.delay_ms,
            "cpu_util": self.cpu_util,
            "user_us_per_request": self.user_us,
            "system_us_per_request": self.system_us,
            "rps_per_cpu": self.rps_per_cpu,
            "load_average": self.load_average,
            "core_busy": self.core_busy,
            **self.wrk.as_dict(),
            **self.notes,
        }


def paced_load(rate: float, duration: float, connections: int) -> Load:
    """A load of about ``rate`` requests/s: wrk's delay is whole milliseconds per connection."""
    delay_ms = max(1, round(connections * 1000 / rate))
    return Load(
        connections=max(1, round(rate * delay_ms / 1000)),
        duration=duration,
        delay_ms=delay_ms,
    )


class Campaign:
    def __init__(self, env: Environment, plan: Plan, scripts: tuple[Path, Path]) -> None:
        self.env = env
        self.plan = plan
        self.saturation_script, self.paced_script = scripts
        self.measurements: list[Measurement] = []

    def measure(
        self, configuration: Configuration, load: Load, *, phase: str, round_: int
    ) -> Measurement:
        env = self.env
        port = env.upstream_port if configuration.name == DIRECT else free_port()
        load = replace(load, headers=tuple(configuration.request_headers(env).items()))
        started = configuration.start(env, port)
        script = self.paced_script if load.delay_ms is not None else self.saturation_script
        measured = started if started is not None else env.upstream
        try:
            if self.plan.warmup > 0:
                warmup = replace(load, duration=self.plan.warmup)
                run_wrk(warmup, port, script, core=CORE_LOAD)
            user_before, system_before = group_cpu_seconds(measured.pid)
            cores_before = core_times()
            load_before = load_average()
            result = run_wrk(load, port, script, core=CORE_LOAD)
            cores = core_busy(cores_before, core_times())
            user_after, system_after = group_cpu_seconds(measured.pid)
        finally:
            if started is not None:
                env.supervisor.stop(started)
        user = user_after - user_before
        system = system_after - system_before
        requests = result.requests or 1
        measurement = Measurement(
            configuration=configuration.name,
            phase=phase,
            round=round_,
            wrk=result,
            connections=load.connections,
            cpu_util=round((user + system) / result.duration_s, 3) if result.duration_s else None,
            user_us=round(user * 1e6 / requests, 1),
            system_us=round(system * 1e6 / requests, 1),
            core_busy=cores,
            load_average=max(load_before, load_average()),
            delay_ms=load.delay_ms,
            notes=configuration.inspect(env, port),
        )
        self.measurements.append(measurement)
        _print_progress(measurement, self.plan.rounds)
        return measurement

    def saturation_rounds(self) -> None:
        load = Load(self.plan.connections, self.plan.duration)
        for round_ in range(1, self.plan.rounds + 1):
            for configuration in self.plan.configurations:
                self.measure(configuration, load, phase=SATURATION, round_=round_)

    def paced_rounds(self, configurations: list[Configuration], rate: float) -> None:
        load = paced_load(rate, self.plan.duration, self.plan.connections)
        print(
            f"\npaced at ~{rate:,.0f} req/s: {load.connections} connections, "
            f"a random 0-{2 * (load.delay_ms or 0)} ms (mean {load.delay_ms} ms) between a "
            "response and the next request",
            flush=True,
        )
        for round_ in range(1, self.plan.rounds + 1):
            for configuration in configurations:
                self.measure(configuration, load, phase=PACED, round_=round_)


def _print_progress(m: Measurement, rounds: int) -> None:
    r = m.wrk
    cpu = f"cpu {m.cpu_util:4.0%}" if m.cpu_util is not None else ""
    cores = "cores " + "/".join(f"{b:.0%}" for b in m.core_busy)
    problems = []
    if r.non_2xx:
        problems.append(f"{r.non_2xx} non-2xx")
    if r.socket_errors:
        problems.append(f"{r.socket_errors} socket errors")
    flag = f"  !! {', '.join(problems)}" if problems else ""
    print(
        f"  {m.phase:<10} round {m.round}/{rounds}  {m.configuration:<18}"
        f" {r.rps:>9,.0f} req/s  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms"
        f"  {cpu}  {cores}{flag}",
        flush=True,
    )
