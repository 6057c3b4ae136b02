"""Load from ``wrk``: saturation runs, and paced runs for latency at a given request rate.

A ``done`` hook writes the summary as one JSON line, so percentiles come exact (microseconds)
from wrk's histogram instead of parsed from its rounded text. Only ``done`` is defined for
saturation runs: wrk stays on its C fast path (a ``request``/``response`` hook would cost Lua
per request).

Paced runs add ``delay()``, wrk's think time between a response and the next request on a
connection: with C connections and a mean delay of D ms the rate is about C / (D + latency).
The delay is drawn uniformly from 0..2D whole milliseconds: a fixed one keeps the connections
in step, and all C requests then arrive in the same millisecond, a burst that measures
queueing rather than the proxy. wrk has no open-loop (wrk2-style) mode, so a stall delays the
following requests instead of queueing them, and the tail is somewhat understated
(coordinated omission); at half of saturation, where stalls are rare, the effect is small.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.processes import BenchError

_MARK = "BENCH_JSON "

_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"bytes":%d,'
    .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
    .. '"latency_us":{"p50":%.1f,"p75":%.1f,"p90":%.1f,"p99":%.1f,"p999":%.1f,'
    .. '"mean":%.1f,"stdev":%.1f,"max":%.1f}}\\n',
    "MARK", summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9),
    latency.mean, latency.stdev, latency.max))
end
""".replace("MARK", _MARK)

_PACED = """
local pause = 1
init = function(args)
  pause = tonumber(args[1])
  math.randomseed(os.time())
end
delay = function()
  return math.random(0, 2 * pause)
end
"""


@dataclass(frozen=True)
class Load:
    """How wrk drives one run."""

    connections: int
    duration: float
    threads: int = 1
    delay_ms: int | None = None  # paced run: think time per connection
    headers: tuple[tuple[str, str], ...] = ()  # sent with every request (wrk -H)

    def argv(self, url: str, script: Path) -> list[str]:
        argv = [
            "wrk",
            f"-t{self.threads}",
            f"-c{self.connections}",
            f"-d{max(1, round(self.duration))}s",
            "--timeout",
            "5s",
            "-s",
            str(script),
        ]
        for name, value in self.headers:
            argv += ["-H", f"{name}: {value}"]
        argv.append(url)
        if self.delay_ms is not None:
            argv += ["--", str(self.delay_ms)]
        return argv


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int

    @property
    def clean(self) -> bool:
        return self.non_2xx == 0 and self.socket_errors == 0

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def write_scripts(workdir: Path) -> tuple[Path, Path]:
    """The saturation script and the paced one, written once per benchmark."""
    saturation = workdir / "summary.lua"
    saturation.write_text(_DONE)
    paced = workdir / "paced.lua"
    paced.write_text(_PACED + _DONE)
    return saturation, paced


def run_wrk(load: Load, port: int, script: Path, *, core: int | str) -> WrkResult:
    argv = ["taskset", "-c", str(core), *load.argv(f"http://127.0.0.1:{port}/", script)]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=load.duration + 30, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish: {' '.join(argv)}") from None
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout}")
    return parse_summary(done.stdout)


def parse_summary(output: str) -> WrkResult:
    for line in output.splitlines():
        if line.startswith(_MARK):
            data = json.loads(line[len(_MARK) :])
            break
    else:
        raise BenchError(f"wrk printed no summary:\n{output.strip()}")
    lat = {k: v / 1000 for k, v in data["latency_us"].items()}
    errors = data["errors"]
    duration_s = data["duration_us"] / 1e6
    return WrkResult(
        requests=data["requests"],
        duration_s=round(duration_s, 3),
        rps=round(data["requests"] / duration_s, 1) if duration_s else 0.0,
        p50_ms=lat["p50"],
        p75_ms=lat["p75"],
        p90_ms=lat["p90"],
        p99_ms=lat["p99"],
        p999_ms=lat["p999"],
        mean_ms=round(lat["mean"], 4),
        max_ms=lat["max"],
        non_2xx=errors["status"],
        socket_errors=errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
    )
