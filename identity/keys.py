"""Signing keys and their rotation (RFC 7517 JWKS; OIDC Core §10.1.1 rollover).

A key's life: published in the JWKS from `created_at`, signs from `active_from` (a rotation
creates the next key `publish_ahead` seconds before it signs, so caches holding the old JWKS
learn it first), stops signing at `retire_at`, and leaves the JWKS at `expire_at`, after the
longest-lived token it signed has expired. Replicas share keys through the database, where
the private keys are sealed with the hub's key secret (`key_encryption.py`, ADR 20).
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from sqlalchemy import insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from cityplane.storage import is_postgresql, writer
from identity.key_encryption import KeyEncryption, KeySecretError, is_encrypted
from identity.models import signing_keys

log = logging.getLogger(__name__)

ALGORITHMS = ("ES256", "RS256")
_KEYS_LOCK = 0x4B455953  # "KEYS": replicas create and rotate keys one at a time


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    alg: str
    private: Any  # cryptography private key
    public_jwk: dict[str, Any]
    created_at: float
    active_from: float
    retire_at: float | None
    expire_at: float | None

    def signs_at(self, now: float) -> bool:
        return self.active_from <= now and (self.retire_at is None or now < self.retire_at)

    def published_at(self, now: float) -> bool:
        return self.created_at <= now and (self.expire_at is None or now < self.expire_at)


def _generate(alg: str) -> tuple[Any, dict[str, Any]]:
    if alg == "ES256":
        private: Any = ec.generate_private_key(ec.SECP256R1())
        jwk = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    elif alg == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    else:
        raise ValueError(f"unsupported signing algorithm {alg!r} (use one of {ALGORITHMS})")
    jwk.pop("key_ops", None)  # we set "use"; RFC 7517 §4.3 says not both
    return private, jwk


async def stored_keys_encrypted(engine: AsyncEngine) -> bool:
    """Whether the database holds a signing key sealed with some key secret."""
    async with engine.connect() as conn:
        pems = (await conn.execute(select(signing_keys.c.private_pem))).scalars().all()
    return any(is_encrypted(pem) for pem in pems)


@dataclass(slots=True)
class _Opened:
    """A stored key as this ring opened it: the text it read, and whether that is sealed with the
    current secret (else `reseal` rewrites it)."""

    pem: str
    private: Any
    current: bool


class KeyRing:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        alg: str = "ES256",
        token_lifetime: float = 3600.0,
        publish_ahead: float = 600.0,
        rotate_after: float = 30 * 86400.0,
        encryption: KeyEncryption | None = None,
    ) -> None:
        if alg not in ALGORITHMS:
            raise ValueError(f"unsupported signing algorithm {alg!r} (use one of {ALGORITHMS})")
        self._engine = engine
        self.alg = alg  # access tokens, and ID tokens of clients that do not ask for another
        # OIDC Core §15.1: an OP must be able to sign ID tokens with RS256, whatever it prefers.
        self.algorithms = (alg, *(a for a in ALGORITHMS if a != alg))
        self.token_lifetime = token_lifetime  # the longest lifetime of anything we sign
        self.publish_ahead = publish_ahead
        self.rotate_after = rotate_after
        self.encryption = encryption or KeyEncryption(None)
        self._keys: list[SigningKey] = []
        self._opened: dict[str, _Opened] = {}
        self._jwks_cache: tuple[float, bytes] | None = None

    async def load(self) -> None:
        """Read every key. Raises KeySecretError, before anything is written, when a key this
        ring has not held yet does not open with its secrets."""
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(signing_keys))).mappings().all()
        keys = []
        opened = {}
        for row in rows:
            seen = opened[row["kid"]] = self._open(row["kid"], row["private_pem"])
            keys.append(
                SigningKey(
                    row["kid"],
                    row["alg"],
                    seen.private,
                    dict(row["public_jwk"]),
                    row["created_at"],
                    row["active_from"],
                    row["retire_at"],
                    row["expire_at"],
                )
            )
        keys.sort(key=lambda k: k.active_from)
        self._keys = keys
        self._opened = opened
        self._jwks_cache = None

    def _open(self, kid: str, pem: str) -> _Opened:
        # Decrypting costs ~0.5 ms (PBKDF2, 2,048 rounds) on the event loop: done once per key
        # and text, not on every minute's load.
        held = self._opened.get(kid)
        if held is not None and held.pem == pem:
            return held
        try:
            private, current = self.encryption.unseal(kid, pem)
        except KeySecretError:
            if held is None:
                raise
            # Another replica re-encrypted it with a secret this one lacks (a secret rotation
            # rolling out). A key never changes under its kid: keep signing with the one held,
            # and leave the row alone (sealing it back with an older secret would undo theirs).
            log.warning(
                "signing key %s was re-encrypted with a key secret this hub does not have; "
                "using the copy loaded before (restart it with the new secret)",
                kid,
            )
            return _Opened(pem, held.private, current=True)
        return _Opened(pem, private, current)

    async def reseal(self) -> int:
        """Rewrite the keys that are stored plain, or sealed with the previous secret, sealed
        with the current one. Each row changes only if it still holds the text that was read,
        so replicas doing this together write each key once. Returns how many were rewritten."""
        stale = {kid: seen for kid, seen in self._opened.items() if not seen.current}
        if not stale:
            return 0
        rewritten = 0
        async with writer(self._engine).begin() as conn:
            if is_postgresql(self._engine):
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _KEYS_LOCK})
            for kid, seen in stale.items():
                result = await conn.execute(
                    update(signing_keys)
                    .where(signing_keys.c.kid == kid, signing_keys.c.private_pem == seen.pem)
                    .values(private_pem=self.encryption.seal(seen.private))
                )
                rewritten += result.rowcount
        if rewritten:
            log.info("re-encrypted %d signing keys with the current key secret", rewritten)
        await self.load()
        return rewritten

    async def ensure(self, now: float | None = None) -> None:
        """Each algorithm has a key that signs now (first start: one that signs at once); rotate
        when a signing key is older than `rotate_after`. Replicas decide under one lock, so two
        hubs starting together on one database make one key per algorithm, not two. Keys not
        sealed with the current secret are resealed first (`reseal`)."""
        now = time.time() if now is None else now
        await self.load()  # a key that does not open stops here: nothing is made over it
        await self.reseal()
        for alg in self.algorithms:
            current = self._signing_or_none(now, alg)
            due = current is None or (
                now - current.active_from >= self.rotate_after and not self._pending(now, alg)
            )
            if due:
                await self._add(
                    now,
                    alg,
                    active_from=now if current is None else now + self.publish_ahead,
                    retire_kid=current.kid if current else None,
                    only_if_due=True,
                )

    def _due(self, rows: Any, now: float, alg: str) -> bool:
        rows = [r for r in rows if r["alg"] == alg]
        signing = [
            r["active_from"]
            for r in rows
            if r["active_from"] <= now and (r["retire_at"] is None or now < r["retire_at"])
        ]
        if any(r["active_from"] > now for r in rows):
            return False  # a rotation is already under way
        return not signing or now - max(signing) >= self.rotate_after

    def _pending(self, now: float, alg: str) -> bool:
        return any(k.active_from > now and k.alg == alg for k in self._keys)

    async def rotate(self, now: float | None = None) -> list[SigningKey]:
        """Publish new keys now (one per algorithm); they sign `publish_ahead` seconds later,
        when the current ones retire. Those stay in the JWKS until their last token expired."""
        now = time.time() if now is None else now
        made = []
        for alg in self.algorithms:
            current = self._signing_or_none(now, alg)
            new = await self._add(
                now,
                alg,
                active_from=now + self.publish_ahead,
                retire_kid=current.kid if current else None,
            )
            assert new is not None  # without only_if_due, a key is always made
            made.append(new)
        return made

    async def _add(
        self,
        now: float,
        alg: str,
        *,
        active_from: float,
        retire_kid: str | None = None,
        only_if_due: bool = False,
    ) -> SigningKey | None:
        private, jwk = _generate(alg)
        kid = f"{alg.lower()}-{time.strftime('%Y%m%d', time.gmtime(now))}-{secrets.token_hex(4)}"
        jwk.update({"kid": kid, "alg": alg, "use": "sig"})
        async with writer(self._engine).begin() as conn:
            if is_postgresql(self._engine):
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _KEYS_LOCK})
            if only_if_due and not self._due(
                (await conn.execute(select(signing_keys))).mappings().all(), now, alg
            ):
                # Another replica made the key while we looked (we looked again, locked).
                await conn.rollback()
                await self.load()
                return None
            if retire_kid is not None:
                await conn.execute(
                    update(signing_keys)
                    .where(signing_keys.c.kid == retire_kid)
                    .values(retire_at=active_from, expire_at=active_from + self.token_lifetime + 60)
                )
            await conn.execute(
                insert(signing_keys).values(
                    kid=kid,
                    alg=alg,
                    private_pem=self.encryption.seal(private),
                    public_jwk=jwk,
                    created_at=now,
                    active_from=active_from,
                    retire_at=None,
                    expire_at=None,
                )
            )
        log.info("signing key %s published; signs from %s", kid, time.ctime(active_from))
        await self.load()
        return next((k for k in self._keys if k.kid == kid), None)

    def _signing_or_none(self, now: float, alg: str) -> SigningKey | None:
        candidates = [k for k in self._keys if k.alg == alg and k.signs_at(now)]
        return candidates[-1] if candidates else None

    def signing_key(self, now: float | None = None, alg: str | None = None) -> SigningKey:
        key = self._signing_or_none(time.time() if now is None else now, alg or self.alg)
        if key is None:  # ensure() runs at start and every minute; this is a bug, not input
            raise RuntimeError(f"no {alg or self.alg} signing key is active")
        return key

    def sign(
        self, claims: dict[str, Any], *, typ: str | None = None, alg: str | None = None
    ) -> str:
        """Sign with the current key of `alg` (default: the hub's algorithm, `self.alg`)."""
        key = self.signing_key(alg=alg)
        headers: dict[str, Any] = {"kid": key.kid}
        if typ:
            headers["typ"] = typ
        return jwt.encode(claims, key.private, algorithm=key.alg, headers=headers)

    def public_keys(self) -> dict[str, Any]:
        """kid -> cryptography public key, for verifying our own tokens (introspection)."""
        return {k.kid: k.private.public_key() for k in self._keys}

    def jwks(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        # RFC 7517 §4.3: "use" and "key_ops" should not appear together (PyJWT adds key_ops).
        return {
            "keys": [
                {n: v for n, v in k.public_jwk.items() if n != "key_ops"}
                for k in self._keys
                if k.published_at(now)
            ]
        }
