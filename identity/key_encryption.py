"""Signing keys encrypted at rest under a key secret (ADR 20).

A private key is stored as a PKCS #8 `ENCRYPTED PRIVATE KEY` (RFC 5958 §3): PBES2 with
PBKDF2-HMAC-SHA256 and AES-256-CBC (RFC 8018 §6.2), what cryptography's BestAvailableEncryption
writes. A copy of the database alone then gives away no key that signs tokens, and an operator
can still open a key by hand: `openssl pkcs8 -in key.pem -passin file:SECRET_FILE`.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

log = logging.getLogger(__name__)

# PBKDF2 runs only 2,048 rounds here (OpenSSL's default for PKCS #8), so the secret itself must
# carry the entropy: 32 characters, e.g. `openssl rand -base64 32` (44).
MIN_SECRET_LENGTH = 32
MAX_SECRET_LENGTH = 1023  # OpenSSL's limit for a PKCS #8 password
_ENCRYPTED_PEM = "-----BEGIN ENCRYPTED PRIVATE KEY-----"
_HOW = "give the hub a key secret with --key-secret-file or CITYPLANE_KEY_SECRET"


class KeySecretError(Exception):
    """A key secret is unusable, or does not open a stored key; one line for the command line."""


@dataclass(frozen=True, slots=True)
class KeySecret:
    """The secret that encrypts signing keys, and where it came from (for messages only)."""

    value: bytes = field(repr=False)
    source: str

    @classmethod
    def checked(cls, value: bytes, source: str) -> KeySecret:
        # A trailing newline (`echo`, `kubectl create secret --from-file`) is not part of it.
        value = value.strip()
        if len(value) < MIN_SECRET_LENGTH:
            raise KeySecretError(
                f"the key secret from {source} is {len(value)} characters long; it needs at "
                f"least {MIN_SECRET_LENGTH} (make one with `openssl rand -base64 32`)"
            )
        if len(value) > MAX_SECRET_LENGTH:
            raise KeySecretError(
                f"the key secret from {source} is longer than {MAX_SECRET_LENGTH} bytes"
            )
        return cls(value, source)


def read_key_secret(path: Path, source: str) -> KeySecret:
    try:
        mode = path.stat().st_mode
        value = path.read_bytes()
    except OSError as exc:
        raise KeySecretError(f"{source}: {exc.strerror or exc}") from None
    secret = KeySecret.checked(value, source)
    if mode & stat.S_IRWXO:
        log.warning("the key secret file %s is open to other users; chmod 600 it", path)
    return secret


def configured_key_secret(
    path: Path | None, env_value: str | None, *, flag: str, env: str
) -> KeySecret | None:
    """A key secret given as a file (`flag`) or as the value of the variable `env`; not both."""
    if path is not None and env_value is not None:
        raise KeySecretError(f"give {flag} or {env}, not both")
    if path is not None:
        return read_key_secret(path, f"{flag} {path}")
    if env_value is not None:
        return KeySecret.checked(env_value.encode(), env)
    return None


def load_or_create_key_secret(path: Path) -> KeySecret:
    """The embedded hub's own key secret: read, or generated (256 bits) into a new 0600 file."""
    source = f"the key secret file {path}"
    value = secrets.token_urlsafe(32).encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # O_EXCL: never overwrite a secret that exists (keys may be sealed with it); 0o600 from
        # the first byte.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_key_secret(path, source)
    except OSError as exc:
        raise KeySecretError(f"cannot create {source}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "wb") as file:
        file.write(value + b"\n")
    log.info("generated the key secret of the signing keys in %s", path)
    return KeySecret(value, source)


def is_encrypted(pem: str) -> bool:
    return pem.lstrip().startswith(_ENCRYPTED_PEM)


class KeyEncryption:
    """Seals private keys with the current secret; opens them with it, or with the previous
    secret during a rotation. Without a secret keys are stored and read as plain PKCS #8."""

    def __init__(self, secret: KeySecret | None, previous: KeySecret | None = None) -> None:
        if previous is not None and secret is None:
            raise KeySecretError(
                "a previous key secret needs a current one to re-encrypt the keys with: " + _HOW
            )
        self.secret = secret
        self.previous = previous

    def seal(self, private: Any) -> str:
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(self.secret.value)
            if self.secret is not None
            else serialization.NoEncryption()
        )
        pem: bytes = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )
        return pem.decode()

    def unseal(self, kid: str, pem: str) -> tuple[Any, bool]:
        """(private key, whether `pem` is sealed the way `seal` would seal it now). A key that
        was stored plain, or sealed with the previous secret, opens but is not current."""
        if not is_encrypted(pem):
            return _load_plain(kid, pem), self.secret is None
        if self.secret is None:
            raise KeySecretError(f"signing key {kid} is encrypted but no key secret is set: {_HOW}")
        for secret in (self.secret, self.previous):
            if secret is None:
                continue
            try:
                private = serialization.load_pem_private_key(pem.encode(), secret.value)
            except ValueError:
                continue  # a wrong secret, or a damaged text: without a MAC they look alike
            return private, secret is self.secret
        tried = self.secret.source + (
            f" nor with the previous one from {self.previous.source}" if self.previous else ""
        )
        raise KeySecretError(
            f"signing key {kid} does not open with the key secret from {tried}: give the secret "
            "it was encrypted with (after a rotation: as --previous-key-secret-file)"
        )


def _load_plain(kid: str, pem: str) -> Any:
    # A damaged row must fail as one line, not as a traceback.
    try:
        return serialization.load_pem_private_key(pem.encode(), None)
    except (ValueError, TypeError) as exc:
        raise KeySecretError(
            f"signing key {kid}: the stored private key is unreadable ({exc})"
        ) from None
