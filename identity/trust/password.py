"""Passwords: argon2id hashes and the rules for choosing a new password.

Hashing parameters are the OWASP Password Storage Cheat Sheet's first argon2id option
(https://cheatsheetseries.owasp.org/cheatsheets/Password_Storage_Cheat_Sheet.html#argon2id):
m = 19 MiB, t = 2, p = 1. Passwords are NFKC-normalized before hashing, as NIST SP 800-63B
§5.1.1.2 recommends, so the same password typed on two keyboards verifies.

New passwords follow NIST SP 800-63B §5.1.1.2: at least 8 characters, no composition rules,
a generous maximum (256), and refused when they are common or contain the username.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import itertools
import os
import secrets
import unicodedata
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_T = TypeVar("_T")

MIN_LENGTH = 8
MAX_LENGTH = 256
# Words that are about this service in particular (SP 800-63B §5.1.1.2 "context-specific words").
CONTEXT_WORDS = ("cityplane",)


def _normalize(password: str) -> str:
    return unicodedata.normalize("NFKC", password)


class PasswordHasher:
    """argon2id hashing that never blocks the event loop and never floods the machine.

    A hash takes tens of milliseconds of CPU and 19 MiB of memory; argon2-cffi releases the
    GIL while it works, so a thread pool gives real parallelism and keeps the event loop
    answering other requests. The pool has ``concurrency`` threads (2 x CPU by default) and a
    per-loop semaphore of the same size sits in front of it, so a login flood queues as cheap
    coroutines (which can still be cancelled when the client goes away) instead of piling work
    into the pool or spawning threads.
    """

    def __init__(
        self,
        *,
        time_cost: int = 2,
        memory_cost: int = 19 * 1024,  # KiB
        parallelism: int = 1,
        concurrency: int | None = None,
    ) -> None:
        self._hasher = argon2.PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_cost,
            parallelism=parallelism,
            type=argon2.Type.ID,
        )
        self.concurrency = concurrency or 2 * (os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="argon2")
        # asyncio primitives belong to one event loop; tests (and `cityplane up`) may use many.
        self._gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )
        self._dummy: str | None = None

    async def _run(self, fn: Callable[[], _T]) -> _T:
        loop = asyncio.get_running_loop()
        gate = self._gates.get(loop)
        if gate is None:
            gate = self._gates[loop] = asyncio.Semaphore(self.concurrency)
        async with gate:
            return await loop.run_in_executor(self._pool, fn)

    async def hash(self, password: str) -> str:
        return await self._run(functools.partial(self._hash_sync, _normalize(password)))

    def _hash_sync(self, password: str) -> str:
        return self._hasher.hash(password)

    async def verify(self, encoded: str, password: str) -> bool:
        """True when ``password`` matches; False on mismatch or an unreadable hash."""
        return await self._run(functools.partial(self._verify_sync, encoded, password))

    def _verify_sync(self, encoded: str, password: str) -> bool:
        try:
            return self._hasher.verify(encoded, _normalize(password))
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def verify_missing_user(self, password: str = "") -> bool:
        """Spend the time a wrong password would, then answer False.

        Without it an unknown username answers in microseconds and a wrong password in tens of
        milliseconds, which tells an attacker which usernames exist (OWASP Authentication
        Cheat Sheet, "Authentication and Error Messages").
        """
        if self._dummy is None:
            self._dummy = await self.hash(secrets.token_urlsafe(16))
        await self.verify(self._dummy, password or "-")
        return False

    def needs_rehash(self, encoded: str) -> bool:
        """True when ``encoded`` was made with other parameters (or cannot be read)."""
        try:
            return self._hasher.check_needs_rehash(encoded)
        except (InvalidHashError, ValueError):
            return True

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@functools.cache
def common_passwords() -> frozenset[str]:
    """The bundled list of common and breached passwords, lower-cased, loaded once."""
    text = importlib.resources.files(__package__).joinpath("common_passwords.txt").read_text()
    return frozenset(
        line.strip().lower() for line in text.splitlines() if line.strip() and line[0] != "#"
    )


def check_new_password(password: str, *, username: str | None = None) -> str | None:
    """Why ``password`` may not be chosen, in words for the person; None when it is fine."""
    password = _normalize(password)
    if len(password) < MIN_LENGTH:
        return f"Use at least {MIN_LENGTH} characters."
    if len(password) > MAX_LENGTH:
        return f"Use at most {MAX_LENGTH} characters."
    lowered = password.casefold()
    if username:
        name = _normalize(username).casefold().strip()
        if name and (lowered == name or (len(name) >= 3 and name in lowered)):
            return "Do not use your username in your password."
    if len(set(lowered)) == 1:
        return "Do not repeat a single character."
    if lowered in common_passwords():
        return "This password is too common; it appears in lists of breached passwords."
    if any(word in lowered for word in CONTEXT_WORDS):
        return "Do not use the name of this service in your password."
    if _is_sequence(lowered):
        return "Do not use a simple sequence like 12345678 or abcdefgh."
    return None


def _is_sequence(text: str) -> bool:
    """Runs like 12345678, 87654321 or abcdefgh (SP 800-63B §5.1.1.2 "sequential characters")."""
    steps = {ord(b) - ord(a) for a, b in itertools.pairwise(text)}
    return steps in ({1}, {-1})
