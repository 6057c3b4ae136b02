"""Helpers for the registry tests: documents, a small API client, an SSE reader, PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiohttp import ClientResponse, ClientSession
from multidict import CIMultiDictProxy

POSTGRES_DSN = os.environ.get(
    "CITYPLANE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def document(name: str = "bus", **spec: Any) -> dict[str, Any]:
    metadata = spec.pop("metadata", {})
    return {
        "apiVersion": "cityplane.io/v1alpha1",
        "kind": "CityService",
        "metadata": {"name": name, **metadata},
        "spec": {
            "upstream": {"targets": [{"url": "http://127.0.0.1:9001"}]},
            "routes": [{"name": "read", "match": {"pathPrefix": f"/{name}/"}}],
            **spec,
        },
    }


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def problem_type(self) -> str:
        assert self.headers["Content-Type"].startswith("application/problem+json"), self.headers
        return str(self.json["type"]).rsplit("/", 1)[-1]


class Api:
    """The admin API of one registry, with the admin token unless told otherwise."""

    def __init__(self, session: ClientSession, url: str, token: str | None) -> None:
        self.session = session
        self.url = url
        self.token = token

    def _headers(self, headers: dict[str, str] | None) -> dict[str, str]:
        merged = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        merged.update(headers or {})
        return merged

    async def request(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> Reply:
        async with self.session.request(
            method, self.url + path, headers=self._headers(headers), **kwargs
        ) as resp:
            return Reply(resp.status, resp.headers, await resp.read())

    async def get(self, path: str, **kwargs: Any) -> Reply:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> Reply:
        return await self.request("POST", path, **kwargs)

    async def put(self, path: str, **kwargs: Any) -> Reply:
        return await self.request("PUT", path, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> Reply:
        return await self.request("DELETE", path, **kwargs)

    async def revision(self) -> int:
        return int((await self.get("/v1/snapshot")).json["revision"])

    @asynccontextmanager
    async def watch(
        self, query: str = "", headers: dict[str, str] | None = None
    ) -> AsyncIterator[Events]:
        async with self.session.get(
            self.url + "/v1/watch" + query, headers=self._headers(headers)
        ) as resp:
            assert resp.status == 200, await resp.text()
            yield Events(resp)


@dataclass
class Event:
    event: str
    id: str | None
    data: Any
    comments: list[str] = field(default_factory=list)


class Events:
    """Reads one Server-Sent Events stream; comments (heartbeats) are kept aside."""

    def __init__(self, response: ClientResponse) -> None:
        self.response = response
        self.comments: list[str] = []

    async def next(self, within: float = 2.0) -> Event:
        async with asyncio.timeout(within):
            return await self._next()

    async def _next(self) -> Event:
        fields: dict[str, str] = {}
        data: list[str] = []
        while True:
            raw = await self.response.content.readline()
            if not raw:
                raise EOFError("the stream ended")
            line = raw.decode().rstrip("\r\n")
            if not line:
                if data or fields:
                    return Event(
                        fields.get("event", "message"),
                        fields.get("id"),
                        json.loads("\n".join(data)),
                    )
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            else:
                fields[name] = value

    async def comment(self, within: float) -> str:
        """Wait for the next comment line (a heartbeat)."""
        seen = len(self.comments)
        async with asyncio.timeout(within):
            while len(self.comments) == seen:
                raw = await self.response.content.readline()
                if not raw:
                    raise EOFError("the stream ended")
                line = raw.decode().rstrip("\r\n")
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                elif line:
                    raise AssertionError(f"expected only a heartbeat, got {line!r}")
        return self.comments[-1]


async def postgres_available() -> bool:
    try:
        conn = await asyncpg.connect(POSTGRES_DSN, timeout=2)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


@asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    """A fresh database `cityplane_test_<random>`, dropped afterwards; yields its SQLAlchemy URL."""
    name = f"cityplane_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(POSTGRES_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        base = POSTGRES_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
        yield f"{base}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def sql(url: str, statement: str, *args: Any) -> list[asyncpg.Record]:
    """Run one statement against a test database (PostgreSQL) outside the registry."""
    dsn = url.replace("postgresql+asyncpg://", "postgresql://", 1)
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(statement, *args))
    finally:
        await conn.close()
