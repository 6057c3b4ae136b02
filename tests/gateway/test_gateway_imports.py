"""A started gateway loads only what its config uses: every library is RSS in every worker.

PyJWT brings cryptography and OpenSSL's libcrypto (~10 MB of RSS), redis and the
OpenTelemetry SDK several more; a gateway without an issuer, a Redis URL or an OTLP endpoint
needs none of them (docs/perf.md, memory).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Runs the CLI's own steps (settings, config check, serve) and prints which of the optional
# libraries were loaded once the gateway is ready; pydantic is the control (always loaded).
_PROBE = """
import asyncio, os, signal, socket, sys
from cityplane.cli import _check_config, _gateway_settings, build_parser
from gateway.runtime import serve

ports = []
for _ in range(2):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        ports.append(str(s.getsockname()[1]))
args = build_parser().parse_args(
    ["gateway", "--config", sys.argv[1], "--port", ports[0], "--status-port", ports[1],
     "--access-log", "off"]
)
settings = _gateway_settings(args)
_check_config(settings)
WATCHED = ("cryptography", "jwt", "redis", "opentelemetry.sdk.trace", "pydantic")

def ready(gateway):
    print(json.dumps(sorted(m for m in WATCHED if m in sys.modules)))
    os.kill(os.getpid(), signal.SIGTERM)

asyncio.run(serve(settings, on_ready=ready))
"""

_CITY = """\
apiVersion: cityplane.io/v1alpha1
kind: CityService
metadata: {name: bus}
spec:
  upstream:
    targets: [{url: "http://127.0.0.1:9"}]
    circuitBreaker: {failureThreshold: 5, resetTimeout: 10s}
  routes:
    - name: all
      match: {pathPrefix: /bus/}
      rateLimit: {requests: 10, window: 1s, key: ip}
"""


def test_a_gateway_without_issuer_redis_or_tracing_loads_none_of_their_libraries(
    tmp_path: Path,
) -> None:
    config = tmp_path / "city.yaml"
    config.write_text(_CITY)
    done = subprocess.run(
        [sys.executable, "-c", "import json\n" + _PROBE, str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == ["pydantic"], done.stderr


def test_redis_timeout_reaches_the_settings_and_nonsense_is_a_usage_error(tmp_path: Path) -> None:
    from cityplane.cli import CliError, _gateway_settings, build_parser

    config = tmp_path / "city.yaml"
    config.write_text(_CITY)

    def settings(*extra: str) -> object:
        args = build_parser().parse_args(["gateway", "--config", str(config), *extra])
        return _gateway_settings(args)

    assert settings().redis_timeout == 0.25
    assert settings("--redis-timeout", "2").redis_timeout == 2.0
    for bad in ("0", "-1", "61", "nan"):
        try:
            settings("--redis-timeout", bad)
        except CliError as exc:
            assert str(exc).startswith(f"--redis-timeout {float(bad):g}:"), exc
        else:
            raise AssertionError(f"--redis-timeout {bad} was accepted")


def test_a_bad_number_in_the_environment_is_one_line_and_a_usage_error(tmp_path: Path) -> None:
    import os

    config = tmp_path / "city.yaml"
    config.write_text(_CITY)
    for name, value in (("CITYPLANE_WORKERS", "x"), ("CITYPLANE_REDIS_TIMEOUT", "abc")):
        done = subprocess.run(
            [sys.executable, "-m", "cityplane.cli", "gateway", "--config", str(config)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, name: value},
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr == f"cityplane: {name}={value!r} is not a number\n"
