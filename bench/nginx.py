"""nginx from Debian, run in the foreground from a config in the work directory.

The system's nginx service is never touched: every instance gets ``-p``/``-c``/``-e`` in the
work directory and ``daemon off`` so that the benchmark owns (and stops) the process.
"""

from __future__ import annotations

import re
from pathlib import Path

from bench.processes import Supervised, Supervisor, wait_until_answers

HERE = Path(__file__).parent
_PLACEHOLDER = re.compile(r"@[A-Z_]+@")

# nginx parses any rate; the zone stores it in thousandths per second. 10M r/s never refuses a
# request here, so the benchmark pays for the lookup and the accounting only. The burst keeps
# requests that arrive within the same millisecond (nginx's clock tick) from being refused.
LIMIT_REQ_ZONE = "limit_req_zone $binary_remote_addr zone=city:1m rate=10000000r/s;"
LIMIT_REQ = "limit_req zone=city burst=1000000 nodelay;"


def render(template: str, **values: str | int | Path) -> str:
    text = (HERE / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    leftover = _PLACEHOLDER.findall(text)
    if leftover:
        raise ValueError(f"{template}: unfilled placeholders {sorted(set(leftover))}")
    return text


def start_nginx(
    supervisor: Supervisor, name: str, config_text: str, port: int, *, core: int
) -> Supervised:
    workdir = supervisor.workdir
    config = workdir / f"{name}-{port}.conf"
    config.write_text(config_text)
    argv = [
        "nginx",
        "-p",
        str(workdir),
        "-c",
        str(config),
        "-e",
        str(workdir / f"{name}-{port}-startup.log"),
        "-g",
        "daemon off;",
    ]
    started = supervisor.start(name, argv, core=core)
    wait_until_answers(started, port)
    return started


def start_upstream(supervisor: Supervisor, port: int, *, core: int) -> Supervised:
    text = render("upstream.conf", WORKDIR=supervisor.workdir, PORT=port)
    return start_nginx(supervisor, "upstream", text, port, core=core)


def start_proxy(
    supervisor: Supervisor, port: int, upstream_port: int, *, limit_req: bool, core: int
) -> Supervised:
    text = render(
        "proxy.conf",
        WORKDIR=supervisor.workdir,
        PORT=port,
        UPSTREAM_PORT=upstream_port,
        LIMIT_REQ_ZONE=LIMIT_REQ_ZONE if limit_req else "",
        LIMIT_REQ=LIMIT_REQ if limit_req else "",
    )
    name = "nginx-limit-req" if limit_req else "nginx"
    return start_nginx(supervisor, name, text, port, core=core)
