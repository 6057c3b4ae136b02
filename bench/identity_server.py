"""The identity hub under test: started as its own pinned process, given the benchmark's
clients through the admin API, and walked through sign-ins to mint refresh tokens.

The hub runs as `cityplane identity --demo` (the command operators run, uvloop included) on
core 0; everything here that talks to it runs in the benchmark's process, before the measured
window, so none of it counts.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import asyncpg

from bench.processes import CORE_UNDER_TEST, BenchError, Supervised, Supervisor, wait_until_answers

CALLBACK = "http://127.0.0.1:9/callback"  # never contacted: the code is read from the Location
SERVICE_CLIENT = "bench-service"
WEB_CLIENT = "bench-web"
# A level-1 demo account (identity/demo.py): the password page is its only sign-in step.
USERNAME, PASSWORD = "citizen1", "demo-citizen-1"
SERVICE_SCOPE = "bus:read"
WEB_SCOPE = "openid offline_access bus:read"


@dataclass
class HubUnderTest:
    """A running hub and the credentials the measurements use against it."""

    process: Supervised
    port: int
    data_dir: Path
    secrets: dict[str, str] = field(default_factory=dict)  # client_id -> client_secret

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def basic(self, client_id: str) -> str:
        # RFC 6749 §2.3.1: both parts are form-urlencoded first; ours need no escaping.
        raw = f"{client_id}:{self.secrets[client_id]}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def start_hub(
    supervisor: Supervisor, port: int, data_dir: Path, database_url: str | None = None
) -> Supervised:
    """`cityplane identity` on its own core, ready to answer; a fresh SQLite database under
    ``data_dir`` unless ``database_url`` names one."""
    argv = [
        sys.executable,
        "-m",
        "cityplane.cli",
        "--log-level",
        "warning",
        "identity",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--demo",
        *(["--database-url", database_url] if database_url else []),
    ]
    hub = supervisor.start("identity", argv, core=CORE_UNDER_TEST)
    # Migrations and the demo accounts' argon2 hashes take a few seconds on a busy core.
    wait_until_answers(hub, port, path="/readyz", timeout=60.0)
    return hub


async def register_clients(hub: HubUnderTest) -> None:
    """The benchmark's two clients, through the admin API (docs/identity-api.md)."""
    token = (hub.data_dir / "identity-admin-token").read_text().strip()
    specs = {
        SERVICE_CLIENT: {
            "name": "Benchmark service",
            "scopes": [SERVICE_SCOPE],
            "grant_types": ["client_credentials"],
            "owner": "org-transport",
        },
        WEB_CLIENT: {
            "name": "Benchmark web app",
            "redirect_uris": [CALLBACK],
            "scopes": WEB_SCOPE.split(),
            "grant_types": ["authorization_code", "refresh_token"],
        },
    }
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        for client_id, spec in specs.items():
            async with http.put(f"{hub.issuer}/admin/clients/{client_id}", json=spec) as r:
                body = await r.json(content_type=None)
                if r.status != 201 or "client_secret" not in body:
                    raise BenchError(f"registering {client_id}: HTTP {r.status} {body}")
                hub.secrets[client_id] = body["client_secret"]


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    # RFC 7636 §4.2: BASE64URL-ENCODE(SHA256(ASCII(code_verifier))) == code_challenge
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def authorize_query(challenge: str) -> str:
    return urlencode(
        {
            "response_type": "code",
            "client_id": WEB_CLIENT,
            "redirect_uri": CALLBACK,
            "scope": WEB_SCOPE,
            "state": secrets.token_urlsafe(8),
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
    )


def form_fields(page: str) -> dict[str, str]:
    """The hidden fields of a sign-in page (csrf, flow, action)."""
    fields = {}
    for name in ("csrf", "flow", "action"):
        found = re.search(rf'name="{name}" value="([^"]+)"', page)
        if found is None:
            raise BenchError(f"sign-in page without {name!r}: {page[:300]}")
        fields[name] = found.group(1)
    return fields


async def _walk_to_code(http: aiohttp.ClientSession, issuer: str, challenge: str) -> str:
    """GET /authorize, answer the password and consent pages, return the code."""
    location = f"/authorize?{authorize_query(challenge)}"
    for _ in range(10):
        async with http.get(issuer + location, allow_redirects=False) as r:
            page = await r.text()
            status, location = r.status, r.headers.get("Location", "")
        if status in (302, 303):
            if location.startswith(CALLBACK):
                code = parse_qs(urlsplit(location).query).get("code")
                if not code:
                    raise BenchError(f"authorization failed: {location}")
                return code[0]
            continue
        form = form_fields(page)
        if 'id="consent-form"' in page:
            form["action"] = "allow"
        elif form["action"] == "password":
            form.update(username=USERNAME, password=PASSWORD)
        else:
            raise BenchError(f"unexpected sign-in step {form['action']!r}")
        async with http.post(issuer + "/login", data=form, allow_redirects=False) as r:
            location = r.headers.get("Location", "")
            if r.status != 303:
                raise BenchError(f"POST /login answered {r.status}: {(await r.text())[:300]}")
    raise BenchError("the sign-in did not end with a code")


@dataclass
class Grants:
    refresh_tokens: list[str]
    access_tokens: list[str]


async def mint_refresh_tokens(hub: HubUnderTest, count: int) -> Grants:
    """``count`` independent refresh-token families of one signed-in person: one password
    sign-in, then the session cookie answers every further /authorize."""
    tokens, access = [], []
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        for _ in range(count):
            verifier, challenge = pkce()
            code = await _walk_to_code(http, hub.issuer, challenge)
            form = {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": CALLBACK,
                "code_verifier": verifier,
            }
            headers = {"Authorization": hub.basic(WEB_CLIENT)}
            async with http.post(f"{hub.issuer}/token", data=form, headers=headers) as r:
                body = await r.json(content_type=None)
                if r.status != 200 or "refresh_token" not in body:
                    raise BenchError(f"code exchange: HTTP {r.status} {body}")
            tokens.append(body["refresh_token"])
            access.append(body["access_token"])
    return Grants(tokens, access)


async def create_database(dsn: str) -> str:
    """A fresh PostgreSQL database for one hub (``dsn``: postgresql://user@host:port/db of
    the server); returns its SQLAlchemy URL. PostgreSQL itself is not pinned."""
    name = f"cityplane_bench_identity_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{name}"


async def drop_database(dsn: str, url: str) -> None:
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await admin.close()
