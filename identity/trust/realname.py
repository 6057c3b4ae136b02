"""Real-name verification: does this name go with this resident ID, says an authority.

The hub asks a :class:`RealNameAuthority` (in production an adapter for the public security
bureau's identity verification service or a licensed intermediary; each has its own API and
contract, so each is a small class implementing ``verify``). The answer is a
:class:`RealNameResult`; an outage is :class:`AuthorityUnavailable`, never a "no match", so the
person is told to try later instead of being told their identity is wrong.

:class:`FileRealNameAuthority` is the reference adapter for development and tests: a local
registry file of ``{name, id}`` records (JSON or YAML), re-read when it changes.

``RealNameResult.reason`` is for the audit log, not for the person: telling someone whether
the name or the number was wrong would let them enumerate other people's records.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from identity.trust.resident_id import InvalidResidentId, ResidentId, parse_resident_id


@dataclass(frozen=True)
class RealNameResult:
    matched: bool
    authority: str
    reason: str | None
    checked_at: float


class AuthorityUnavailable(Exception):
    """The authority cannot answer now (outage, timeout, broken registry file)."""


class RealNameAuthority(Protocol):
    async def verify(self, name: str, resident_id: ResidentId) -> RealNameResult:
        """Whether ``name`` is the registered name for ``resident_id``.

        Raises :class:`AuthorityUnavailable` when it cannot tell.
        """
        ...


def normalize_name(name: str) -> str:
    """NFC and trimmed: the same name typed on two devices compares equal."""
    return unicodedata.normalize("NFC", name).strip()


class FileRealNameAuthority:
    """Records from a JSON or YAML file: a list of ``{name, id}`` or ``{"records": [...]}``."""

    name = "file"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._records: dict[str, str] = {}
        self._loaded: tuple[int, int] | None = None  # (mtime_ns, size) of what was read
        self._lock = asyncio.Lock()

    async def verify(self, name: str, resident_id: ResidentId) -> RealNameResult:
        records = await self._current()
        registered = records.get(resident_id.value)
        if registered is None:
            matched, reason = False, "no record for this resident ID"
        elif registered != normalize_name(name):
            matched, reason = False, "name does not match the record"
        else:
            matched, reason = True, None
        return RealNameResult(matched, f"{self.name}:{self.path.name}", reason, time.time())

    async def _current(self) -> dict[str, str]:
        try:
            st = await asyncio.to_thread(os.stat, self.path)
        except OSError as exc:
            raise AuthorityUnavailable(f"real-name registry {self.path}: {exc.strerror}") from exc
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._loaded:
            async with self._lock:
                if stamp != self._loaded:
                    self._records = await asyncio.to_thread(self._read)
                    self._loaded = stamp
        return self._records

    def _read(self) -> dict[str, str]:
        try:
            text = self.path.read_text(encoding="utf-8")
            data: Any = (
                yaml.safe_load(text) if self.path.suffix in {".yaml", ".yml"} else json.loads(text)
            )
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise AuthorityUnavailable(f"real-name registry {self.path}: {exc}") from exc
        if isinstance(data, dict):
            data = data.get("records")
        if not isinstance(data, list):
            raise AuthorityUnavailable(
                f"real-name registry {self.path}: expected a list of {{name, id}} records"
            )
        records: dict[str, str] = {}
        for index, record in enumerate(data):
            if not (
                isinstance(record, dict)
                and isinstance(record.get("name"), str)
                and isinstance(record.get("id"), str)
            ):
                raise AuthorityUnavailable(
                    f"real-name registry {self.path}: record {index} needs string name and id"
                )
            try:
                resident_id = parse_resident_id(record["id"])
            except InvalidResidentId as exc:
                raise AuthorityUnavailable(
                    f"real-name registry {self.path}: record {index}: {exc}"
                ) from None
            records[resident_id.value] = normalize_name(record["name"])
        return records
