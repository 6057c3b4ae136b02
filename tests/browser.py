"""Real headless Chromium for login-page tests: Debian's browser, driven by Playwright.

Fixtures (a test module lists ``pytest_plugins = ["tests.browser"]``, or a conftest imports them):

- ``chromium`` (session): one Chromium process for the whole run, started from
  ``/usr/bin/chromium`` (Debian's package; never a browser downloaded by ``playwright install``).
- ``chromium_browser`` (per test): a Playwright connection to that process, in the test's
  event loop. (Not called ``browser``: tests/identity/conftest.py has a ``browser`` fixture
  for its form-posting client, and would shadow it under tests/identity.)
- ``page`` (per test): a page in a fresh browser context, so cookies and storage never leak
  from one test to the next.
- ``live_server`` (per test): ``await live_server(app)`` runs an aiohttp app on 127.0.0.1 and
  gives back ``http://localhost:PORT``, a secure context, as WebAuthn requires.

Helpers: ``virtual_authenticator(page)`` adds Chromium's virtual WebAuthn authenticator (a
platform passkey provider with user verification) to a page; ``skip_without_chromium()`` skips
when there is no Chromium, and fails instead when ``CI`` is set; ``launch_chromium()`` starts a
private browser with Playwright's ``executable_path`` for a test that needs its own flags.

Use (a test module; a conftest can import the fixtures instead)::

    pytest.register_assert_rewrite("tests.browser")
    from tests.browser import Page, Serve, virtual_authenticator
    pytest_plugins = ["tests.browser"]

    async def test_login_page_signs_in_with_a_passkey(page: Page, live_server: Serve) -> None:
        server = await live_server(make_identity_app())     # http://localhost:PORT
        authenticator = await virtual_authenticator(page)   # before the ceremony starts
        await page.goto(server.url("/login"))
        await page.click("[data-passkey=login]")
        await page.wait_for_url(server.url("/account"))

Why one process but a connection per test: tests run in a fresh event loop each
(``asyncio_default_fixture_loop_scope = "function"``) and Playwright objects belong to the loop
that made them, so a session-wide Playwright ``Browser`` would force every fixture of every
browser test into one shared loop; a mismatch there fails silently (a server fixture in the
test's loop never answers). Keeping the *process* for the session and connecting over CDP per
test costs about 0.34 s per test instead of about 0.67 s for a launch per test (measured here,
see docs/adr/0012-passkeys.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from playwright.async_api import Browser, CDPSession, Page, async_playwright
from playwright.async_api import Error as PlaywrightError

__all__ = [
    "Browser",
    "ChromiumProcess",
    "LiveServer",
    "Page",
    "PlaywrightError",
    "Serve",
    "VirtualAuthenticator",
    "chromium",
    "chromium_available",
    "chromium_browser",
    "launch_chromium",
    "live_server",
    "page",
    "serve",
    "skip_without_chromium",
    "virtual_authenticator",
    "wait_for",
]

CHROMIUM = Path(os.environ.get("CITYPLANE_CHROMIUM", "/usr/bin/chromium"))
log = logging.getLogger("tests.browser")

# Chromium's own switches, mostly those Playwright passes when it launches a browser, so a
# browser we start behaves like one it starts.
CHROMIUM_ARGS = (
    "--headless",
    # The sandbox needs user namespaces that containers usually lack, and Chromium refuses to
    # start as root with it (CI runs as root). Playwright turns it off by default too
    # (chromiumSandbox=False); these tests only load pages they serve themselves.
    "--no-sandbox",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--password-store=basic",
    "--use-mock-keychain",
    "--mute-audio",
    # Pages in headless tabs must not be throttled, or timers in the page slow down tests.
    "--disable-background-timer-throttling",
    "--disable-backgrounding-occluded-windows",
    "--disable-renderer-backgrounding",
)


def chromium_available() -> bool:
    return CHROMIUM.exists() and os.access(CHROMIUM, os.X_OK)


def skip_without_chromium() -> None:
    """Skip the calling test when Chromium is missing; in CI (``CI`` set), fail instead.

    CI installs Debian's ``chromium`` (.ci/run), so a missing browser there is a broken
    environment, and a silent skip would hide every login-page test.
    """
    if chromium_available():
        return
    if os.environ.get("CI"):
        pytest.fail(f"Chromium is not installed at {CHROMIUM} (CI installs Debian's chromium)")
    pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")


@dataclass
class ChromiumProcess:
    """A running Chromium with its DevTools endpoint (``http://127.0.0.1:PORT``)."""

    process: subprocess.Popen[bytes]
    endpoint: str
    profile: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            # Our own process group (start_new_session): renderer and GPU children go too.
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
        shutil.rmtree(self.profile, ignore_errors=True)


def start_chromium(timeout: float = 20.0) -> ChromiumProcess:
    """Start Chromium with a DevTools port chosen by the OS and wait until it listens."""
    profile = Path(tempfile.mkdtemp(prefix="cityplane-chromium-"))
    stderr = (profile / "stderr.log").open("wb")
    process = subprocess.Popen(
        [
            str(CHROMIUM),
            *CHROMIUM_ARGS,
            "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        start_new_session=True,
    )
    stderr.close()
    chromium = ChromiumProcess(process, "", profile)
    # Chromium writes the port it bound to this file once DevTools listens.
    active_port = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        lines = active_port.read_text().splitlines() if active_port.exists() else []
        if lines and lines[0].isdigit():
            chromium.endpoint = f"http://127.0.0.1:{lines[0]}"
            return chromium
        time.sleep(0.05)
    output = (profile / "stderr.log").read_text(errors="replace")[-2000:]
    chromium.stop()
    raise RuntimeError(f"Chromium did not start (exit {process.returncode}):\n{output}")


@pytest.fixture(scope="session")
def chromium() -> Iterator[ChromiumProcess]:
    skip_without_chromium()
    process = start_chromium()
    yield process
    process.stop()


@pytest.fixture
async def chromium_browser(chromium: ChromiumProcess) -> AsyncIterator[Browser]:
    if chromium.process.poll() is not None:
        pytest.fail(f"Chromium exited with {chromium.process.returncode} during the test run")
    async with async_playwright() as playwright:
        connected = await playwright.chromium.connect_over_cdp(chromium.endpoint)
        try:
            yield connected
        finally:
            # Over CDP this closes our contexts and disconnects; the process stays up.
            await connected.close()


@asynccontextmanager
async def launch_chromium(*args: str) -> AsyncIterator[Browser]:
    """A private Chromium launched by Playwright (``executable_path``), for special flags."""
    skip_without_chromium()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=list(args)
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(chromium_browser: Browser) -> AsyncIterator[Page]:
    context = await chromium_browser.new_context()
    # Fail in seconds, not Playwright's 30 s: a login page either answers at once or is broken.
    context.set_default_timeout(10_000)
    opened = await context.new_page()
    # Page console output and uncaught errors land in the test's captured log.
    opened.on("console", lambda message: log.info("console.%s: %s", message.type, message.text))
    opened.on("pageerror", lambda error: log.warning("page error: %s", error))
    try:
        yield opened
    finally:
        await context.close()


@dataclass
class VirtualAuthenticator:
    """Chromium's virtual WebAuthn authenticator on one page (CDP ``WebAuthn`` domain)."""

    id: str
    cdp: CDPSession

    async def credentials(self) -> list[dict[str, Any]]:
        """Its credentials: ``credentialId``, ``rpId``, ``userHandle`` (base64), ``signCount``…"""
        answer = await self.cdp.send("WebAuthn.getCredentials", {"authenticatorId": self.id})
        return list(answer["credentials"])

    async def set_user_verified(self, verified: bool) -> None:
        """Whether the next ceremonies succeed user verification (PIN/biometric)."""
        await self.cdp.send(
            "WebAuthn.setUserVerified", {"authenticatorId": self.id, "isUserVerified": verified}
        )

    async def remove(self) -> None:
        await self.cdp.send("WebAuthn.removeVirtualAuthenticator", {"authenticatorId": self.id})


async def virtual_authenticator(
    page: Page,
    *,
    has_user_verification: bool = True,
    is_user_verified: bool = True,
    has_resident_key: bool = True,
    transport: str = "internal",
) -> VirtualAuthenticator:
    """Give ``page`` a virtual passkey provider: CTAP2, built in, resident keys, UV on.

    Presence is simulated automatically, so ceremonies complete without a click on a
    browser dialog. Pass ``has_user_verification=False`` for an authenticator that cannot
    verify the user at all (a bare security key).
    """
    cdp = await page.context.new_cdp_session(page)
    await cdp.send("WebAuthn.enable", {"enableUI": False})
    added = await cdp.send(
        "WebAuthn.addVirtualAuthenticator",
        {
            "options": {
                "protocol": "ctap2",
                "ctap2Version": "ctap2_1",
                "transport": transport,
                "hasResidentKey": has_resident_key,
                "hasUserVerification": has_user_verification,
                "isUserVerified": is_user_verified,
                "automaticPresenceSimulation": True,
            }
        },
    )
    return VirtualAuthenticator(id=added["authenticatorId"], cdp=cdp)


@dataclass
class LiveServer:
    """An aiohttp app on loopback, addressed as ``localhost`` (a secure context, WebAuthn L3 §5)."""

    runner: web.AppRunner
    port: int

    @property
    def origin(self) -> str:
        return f"http://localhost:{self.port}"

    def url(self, path: str = "/") -> str:
        return self.origin + path


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[LiveServer]:
    """Run ``app`` on 127.0.0.1 on a free port until the block ends."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # 127.0.0.1 only: Chromium resolves "localhost" to loopback itself, and one socket means
    # one port (binding "localhost" could give IPv4 and IPv6 sockets different ports).
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])
    try:
        yield LiveServer(runner, port)
    finally:
        await runner.cleanup()


Serve = Callable[[web.Application], Awaitable[LiveServer]]


@pytest.fixture
async def live_server() -> AsyncIterator[Serve]:
    running: list[Any] = []

    async def start(app: web.Application) -> LiveServer:
        context = serve(app)
        started = await context.__aenter__()
        running.append(context)
        return started

    yield start
    for context in reversed(running):
        await context.__aexit__(None, None, None)


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a server-side condition a browser action should bring about."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
