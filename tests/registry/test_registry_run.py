"""`registry.app.run`: the blocking entry point `cityplane registry` calls."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

from aiohttp import ClientSession

CHILD = """
import logging, sys
from pathlib import Path
from registry.app import RegistrySettings, run
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
run(RegistrySettings(port=0, data_dir=Path(sys.argv[1]), heartbeat=0.2))
"""


async def test_run_serves_until_sigterm_then_exits_cleanly(tmp_path: Path) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(tmp_path), stderr=asyncio.subprocess.PIPE
    )
    assert child.stderr is not None
    log: list[str] = []
    try:
        async with asyncio.timeout(10):
            while not (found := re.search(r"listening on (http://\S+)", "".join(log))):
                line = (await child.stderr.readline()).decode()
                assert line, "".join(log)
                log.append(line)
        url = found.group(1)
        token = (tmp_path / "registry" / "admin-token").read_text().strip()
        async with ClientSession() as session:
            async with session.get(url + "/readyz") as resp:
                assert resp.status == 200
            headers = {"Authorization": f"Bearer {token}"}
            async with session.get(url + "/v1/watch", headers=headers) as watch:
                await watch.content.readline()  # the snapshot has started
                child.send_signal(signal.SIGTERM)
                async with asyncio.timeout(5):
                    assert await child.wait() == 0
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    rest = (await child.stderr.read()).decode()
    assert token not in "".join(log) + rest
    assert (tmp_path / "registry" / "registry.db").exists()
