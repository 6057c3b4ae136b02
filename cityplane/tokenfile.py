"""Bootstrap admin tokens: 256 random bits in a file only its owner can read, never logged."""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

log = logging.getLogger(__name__)


class AdminTokenError(Exception):
    """The token file cannot be read or created; the message is one line for the user."""


def load_or_create_admin_token(path: Path) -> str:
    """Read the bootstrap admin token, or generate it (32 random bytes) into a new 0600 file."""
    try:
        return _read_token(path)
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # O_EXCL: never overwrite a token another process just wrote; 0o600 from the first
        # byte (the umask can only take bits away), not chmod after the fact.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_token(path)
    except OSError as exc:
        raise AdminTokenError(
            f"cannot create the admin token file {path}: {exc.strerror}"
        ) from None
    with os.fdopen(fd, "w", encoding="ascii") as file:
        file.write(token + "\n")
    log.info("generated the bootstrap admin token in %s", path)
    return token


def _read_token(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise AdminTokenError(f"cannot read the admin token file {path}: {exc}") from None
    if not token:
        raise AdminTokenError(f"the admin token file {path} is empty")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("the admin token file %s is open to other users; chmod 600 it", path)
    return token
