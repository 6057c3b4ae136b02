"""One-time codes by SMS: a pluggable sender and the short-lived challenge a code answers.

NIST SP 800-63B §5.1.3.3 calls SMS a *restricted* authenticator (SIM swap, interception); the
trust-level configuration decides what it is worth. The challenge follows §5.1.3 for
out-of-band codes: at least 6 random digits from a CSPRNG, a short validity (5 minutes here;
§5.1.3.2 asks for 10 at most), limited attempts (§5.2.2 rate limiting), one use only, and
only a keyed digest of the code is stored.

The default sender writes to an outbox file so development and tests run anywhere; a real SMS
gateway implements :class:`SmsSender` (one ``async send``) and is configured in its place.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

CODE_DIGITS = 6
DEFAULT_TTL = 300.0
MAX_ATTEMPTS = 5

_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")  # ITU-T E.164: at most 15 digits
_CN_MOBILE = re.compile(r"^1[3-9][0-9]{9}$")  # mainland China mobile numbers, 11 digits
_SEPARATORS = re.compile(r"[\s\-().]")


class InvalidPhone(ValueError):
    """Not an E.164 number nor an 11-digit mainland China mobile number."""


def normalize_phone(text: str) -> str:
    """The number in E.164 form (``+8613812345678``), so one phone has one spelling.

    Accepts E.164 with spaces, dashes or parentheses, and 11-digit mainland China mobile
    numbers with or without the ``+86``/``0086`` prefix.
    """
    compact = _SEPARATORS.sub("", text.strip())
    if compact.startswith("00"):
        compact = "+" + compact[2:]
    if _CN_MOBILE.match(compact):
        return "+86" + compact
    if _E164.match(compact):
        if compact.startswith("+86") and not _CN_MOBILE.match(compact[3:]):
            raise InvalidPhone(f"{text!r} is not a mainland China mobile number")
        return compact
    raise InvalidPhone(f"{text!r} is not a phone number (use +<country><number> or 11 digits)")


def mask_phone(phone: str) -> str:
    """``13812345678`` -> ``138****5678``: the four digits before the last four hidden.

    E.164 numbers keep their country code: ``+8613812345678`` -> ``+86138****5678``.
    """
    if len(phone) < 8:
        return "*" * max(0, len(phone) - 2) + phone[-2:]
    return phone[:-8] + "****" + phone[-4:]


class SmsSender(Protocol):
    async def send(self, phone: str, text: str) -> None:
        """Deliver ``text`` to ``phone`` (E.164); raise on failure so the caller can tell."""
        ...


class OutboxSender:
    """Appends one JSON line ``{"at", "phone", "text"}`` per message to a file (0600).

    The write goes to a worker thread: a slow disk must not stall the event loop. A lock keeps
    lines whole when several sends overlap (O_APPEND alone keeps each ``write`` together on a
    local file system, the lock also covers other file systems).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    async def send(self, phone: str, text: str) -> None:
        line = json.dumps({"at": time.time(), "phone": phone, "text": text}, ensure_ascii=False)
        await asyncio.to_thread(self._append, line + "\n")

    def _append(self, line: str) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)


class LogSender:
    """Logs each message (phone masked) — for development, where the log is the phone."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or log

    async def send(self, phone: str, text: str) -> None:
        self._log.warning("SMS to %s: %s", mask_phone(phone), text)


def _digest(salt: bytes, phone: str, code: str) -> str:
    # The phone is part of the MAC so a challenge cannot be moved to another number.
    return hmac.new(salt, f"{phone}\x00{code}".encode(), hashlib.sha256).hexdigest()


@dataclass
class SmsChallenge:
    """A code sent to ``phone``; only an HMAC of it is kept.

    Mutable on purpose: :meth:`verify` counts attempts and marks the challenge used, and the
    caller stores it back (``to_dict``) — with a compare-and-set or a per-challenge lock when
    several replicas may verify the same challenge at once.
    """

    phone: str
    salt: str  # urlsafe base64
    digest: str  # hex HMAC-SHA256(salt, phone NUL code)
    issued_at: float
    expires_at: float
    attempts: int = 0
    used: bool = False

    @classmethod
    def issue(cls, phone: str, *, now: float, ttl: float = DEFAULT_TTL) -> tuple[SmsChallenge, str]:
        """A new challenge and the code to send (never stored)."""
        code = f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"
        salt = secrets.token_bytes(16)
        challenge = cls(
            phone=phone,
            salt=base64.urlsafe_b64encode(salt).decode(),
            digest=_digest(salt, phone, code),
            issued_at=now,
            expires_at=now + ttl,
        )
        return challenge, code

    def verify(self, code: str, *, now: float) -> bool:
        """True once, for the right code, in time, within :data:`MAX_ATTEMPTS` tries."""
        if self.used or now >= self.expires_at or self.attempts >= MAX_ATTEMPTS:
            return False
        self.attempts += 1
        candidate = _digest(base64.urlsafe_b64decode(self.salt), self.phone, code.strip())
        if hmac.compare_digest(candidate, self.digest):
            self.used = True
            return True
        return False

    @property
    def exhausted(self) -> bool:
        return self.used or self.attempts >= MAX_ATTEMPTS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SmsChallenge:
        return cls(
            phone=str(data["phone"]),
            salt=str(data["salt"]),
            digest=str(data["digest"]),
            issued_at=float(data["issued_at"]),
            expires_at=float(data["expires_at"]),
            attempts=int(data.get("attempts", 0)),
            used=bool(data.get("used", False)),
        )
