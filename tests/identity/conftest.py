"""Identity hubs on real sockets (SQLite in tmp_path, or the real PostgreSQL), and a
form-posting client that walks the sign-in pages the way a browser without JavaScript does."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import pyotp
import pytest

from identity.app import RunningIdentity, start_identity
from identity.demo import TOTP_SECRETS
from identity.hub import IdentitySettings

CALLBACK = "http://localhost:8765/callback"
# What the development face matcher accepts: a PNG of at least 1 KiB.
PHOTO = b"\x89PNG\r\n\x1a\n" + bytes(2048)
SPA_CALLBACK = "http://localhost:8766/callback"


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[RunningIdentity]:
    running = await start_identity(
        IdentitySettings(port=0, data_dir=tmp_path, demo=True, key_publish_ahead=0.5)
    )
    try:
        yield running
    finally:
        await running.stop()


def demo_secret(hub: RunningIdentity, client_id: str = "demo-web") -> str:
    return next(c["client_secret"] for c in hub.hub.demo["clients"] if c["client_id"] == client_id)


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(client_id, secret)}


def totp_now(username: str, ahead: int = 0) -> str:
    """The account's current TOTP code, or the one `ahead` time steps later (the hub accepts
    the next step too, RFC 6238 §5.2, and refuses a step it has already seen)."""
    totp = pyotp.TOTP(TOTP_SECRETS[username])
    return totp.at(time.time() + ahead * totp.interval)


@dataclass
class Walk:
    """What a sign-in walk saw: the pages' steps in order, and where it ended."""

    steps: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)  # what the pages said (errors)
    location: str = ""

    @property
    def query(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlsplit(self.location).query).items()}


class FormBrowser:
    """Cookies + forms, no JavaScript: enough to drive the hub's pages from tests."""

    def __init__(self, issuer: str, *also_inside: str) -> None:
        self.issuer = issuer
        self.base = issuer  # the origin of the page last fetched: relative URLs resolve to it
        # Origins whose pages this browser answers (a federated sign-in crosses two hubs).
        self.inside = {issuer, *also_inside}
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def close(self) -> None:
        await self.http.close()

    async def get(self, url: str) -> tuple[int, str, str]:
        async with self.http.get(self._abs(url), allow_redirects=False) as r:
            return r.status, r.headers.get("Location", ""), await r.text()

    async def post(self, url: str, data: Any) -> tuple[int, str, str]:
        async with self.http.post(self._abs(url), data=data, allow_redirects=False) as r:
            return r.status, r.headers.get("Location", ""), await r.text()

    def _abs(self, url: str) -> str:
        if url.startswith("http"):
            parts = urlsplit(url)
            self.base = f"{parts.scheme}://{parts.netloc}"
            return url
        return self.base + url

    def _leaves(self, location: str) -> bool:
        if location.startswith("/"):
            return False
        parts = urlsplit(location)
        return f"{parts.scheme}://{parts.netloc}" not in self.inside

    async def authorize(self, answers: dict[str, Any], **params: str) -> Walk:
        """GET /authorize with `params`, then answer each page from `answers`
        (password: (username, password), otp: username, realname: (name, id), consent: org or
        "", choose: method) until the hub redirects away from itself."""
        walk = Walk()
        status, location, page = await self.get(f"{self.issuer}/authorize?" + urlencode(params))
        for _ in range(20):
            if status not in (302, 303):
                raise AssertionError(f"expected a redirect, got {status}: {page[:600]}")
            if self._leaves(location):
                walk.location = location
                return walk
            status, location, page = await self.get(location)
            if status != 200:
                if status not in (302, 303):
                    raise AssertionError(f"{status}: {page[:600]}")
                continue
            federated = answers.get("federated")
            if federated and f'id="fed-{federated}"' in page and "fed" not in walk.steps:
                walk.steps.append("fed")
                link = re.search(rf'id="fed-{federated}" href="([^"]+)"', page)
                assert link, page[:2000]
                status, location = 303, link.group(1).replace("&amp;", "&")
                continue
            step = re.search(r'name="action" value="(\w+)"', page)
            chooser = re.search(r'id="method-(\w+)"', page)
            csrf = re.search(r'name="csrf" value="([^"]+)"', page)
            flow = re.search(r'name="flow" value="([^"]+)"', page)
            if chooser and not step:
                walk.steps.append("choose")
                fid = re.search(r"flow=([^&]+)&amp;method", page)
                assert fid, page[:2000]
                status, location = 303, f"/login?flow={fid.group(1)}&method={answers['choose']}"
                continue
            assert step and csrf and flow, page[:2000]
            name = step.group(1)
            if name == "allow" or 'id="consent-form"' in page:
                name = "consent"
            walk.steps.append(name)
            message = re.search(r'id="message">([^<]*)<', page)
            if message:
                walk.messages.append(message.group(1))
            form = {"csrf": csrf.group(1), "flow": flow.group(1), "action": name}
            if name == "password":
                form["username"], form["password"] = answers["password"]
            elif name == "otp":
                otp = answers["otp"]
                form["code"] = totp_now(*otp) if isinstance(otp, tuple) else totp_now(otp)
            elif name == "realname":
                form["name"], form["resident_id"] = answers["realname"]
            elif name == "face":
                photo = aiohttp.FormData(form)
                photo.add_field("photo", PHOTO, filename="me.png", content_type="image/png")
                status, location, page = await self.post("/login", photo)
                continue
            elif name == "consent":
                form["action"] = "allow"
                if answers.get("consent"):
                    form["org"] = answers["consent"]
            else:
                raise AssertionError(f"no answer for step {name}")
            status, location, page = await self.post("/login", form)
        raise AssertionError(f"never finished: {walk.steps} {walk.messages[:3]} at {location}")


async def redeem(hub: RunningIdentity, code: str, verifier: str) -> dict[str, Any]:
    """demo-web exchanges an authorization code (client_secret_basic + PKCE) for tokens."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{hub.issuer}/token",
            headers=basic("demo-web", demo_secret(hub)),
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": CALLBACK,
                "code_verifier": verifier,
            },
        ) as r,
    ):
        body = await r.json()
        assert r.status == 200, body
        return dict(body)


async def sign_in(
    hub: RunningIdentity,
    browser: FormBrowser,
    answers: dict[str, Any],
    *,
    scope: str = "openid",
    **extra: str,
) -> tuple[Walk, dict[str, Any]]:
    """demo-web signs a person in (code + PKCE S256) and redeems the code: (walk, tokens)."""
    verifier, challenge = pkce()
    walk = await browser.authorize(
        answers,
        response_type="code",
        client_id="demo-web",
        redirect_uri=CALLBACK,
        scope=scope,
        code_challenge=challenge,
        code_challenge_method="S256",
        **extra,
    )
    assert "code" in walk.query, walk.location
    return walk, await redeem(hub, walk.query["code"], verifier)


@pytest.fixture
async def browser(hub: RunningIdentity) -> AsyncIterator[FormBrowser]:
    b = FormBrowser(hub.issuer)
    try:
        yield b
    finally:
        await b.close()
