"""The browser harness itself (tests/browser.py): what login-page tests rely on."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web
from playwright.async_api import Page

pytest.register_assert_rewrite("tests.browser")  # before the import: it is a pytest plugin too
import tests.browser as harness  # noqa: E402

pytest_plugins = ["tests.browser"]


def cookie_app() -> web.Application:
    async def set_cookie(_: web.Request) -> web.Response:
        response = web.Response(text="<p>set</p>", content_type="text/html")
        response.set_cookie("session", "from-an-earlier-test", httponly=True, samesite="Lax")
        return response

    async def show(request: web.Request) -> web.Response:
        seen = request.cookies.get("session", "none")
        return web.Response(text=f"<p id='seen'>{seen}</p>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/set", set_cookie)
    app.router.add_get("/show", show)
    return app


async def test_live_server_is_a_secure_context_on_localhost(
    page: Page, live_server: harness.Serve
) -> None:
    server = await live_server(cookie_app())
    assert server.origin.startswith("http://localhost:")
    await page.goto(server.url("/show"))
    # WebAuthn is only exposed to secure contexts; http://localhost is one.
    assert await page.evaluate("window.isSecureContext") is True
    assert await page.evaluate("typeof PublicKeyCredential") == "function"


async def test_each_test_gets_a_page_without_cookies_of_other_pages(
    page: Page, chromium_browser: harness.Browser, live_server: harness.Serve
) -> None:
    server = await live_server(cookie_app())
    await page.goto(server.url("/set"))
    await page.goto(server.url("/show"))
    assert await page.text_content("#seen") == "from-an-earlier-test"
    # The next test's page is a new context of the same browser, like this one.
    fresh = await chromium_browser.new_context()
    other = await fresh.new_page()
    await other.goto(server.url("/show"))
    assert await other.text_content("#seen") == "none"
    await fresh.close()


async def test_virtual_authenticator_can_be_removed(page: Page) -> None:
    authenticator = await harness.virtual_authenticator(page)
    assert await authenticator.credentials() == []
    await authenticator.remove()
    with pytest.raises(harness.PlaywrightError):
        await authenticator.credentials()


async def test_private_browser_is_debians_chromium_launched_by_playwright() -> None:
    async with harness.launch_chromium() as private:
        assert private.version.split(".")[0].isdigit()
        context = await private.new_context()
        assert await (await context.new_page()).evaluate("1 + 1") == 2


def test_missing_chromium_fails_in_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(harness, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="not installed"):
        harness.skip_without_chromium()


def test_missing_chromium_skips_outside_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(harness, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        harness.skip_without_chromium()
