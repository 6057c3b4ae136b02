"""Signing keys encrypted at rest (ADR 20): what lands in the database, what a restart, an
upgrade from plain keys, a wrong secret and a secret rotation do, on real SQLite and PostgreSQL,
through `start_identity` and through the command line."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select

from cityplane.storage import make_engine, migrate, sqlite_url
from identity.app import _MIGRATION_LOCK, IdentityStartError, RunningIdentity, start_identity
from identity.hub import IdentitySettings
from identity.key_encryption import KeyEncryption, KeySecret, KeySecretError
from identity.keys import KeyRing
from identity.models import signing_keys
from tests.cli_process import environment, run_cli
from tests.identity.conftest import basic, demo_secret
from tests.registry.support import postgres_available, postgres_database, sql

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
ISSUER = "https://id.city.example"  # fixed, so tokens from one start carry the next one's `iss`
ENCRYPTED = "-----BEGIN ENCRYPTED PRIVATE KEY-----"
PLAIN = "-----BEGIN PRIVATE KEY-----"
FIRST = KeySecret.checked(b"first-key-secret-0123456789abcdefghijklmnop", "the first secret")
SECOND = KeySecret.checked(b"second-key-secret-0123456789abcdefghijklmno", "the second secret")


@asynccontextmanager
async def running_hub(data_dir: Path, **settings: Any) -> AsyncIterator[RunningIdentity]:
    hub = await start_identity(
        IdentitySettings(port=0, data_dir=data_dir, issuer=ISSUER, demo=True, **settings)
    )
    try:
        yield hub
    finally:
        await hub.stop()


def local(hub: RunningIdentity) -> str:
    """Where the hub listens (its issuer URL names a host that is not this machine)."""
    return f"http://127.0.0.1:{hub.port}"


def stored(db: Path) -> list[tuple[Any, ...]]:
    """Every column of every signing key, as SQLite holds it."""
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT * FROM signing_keys ORDER BY kid").fetchall()


def database_files(folder: Path, name: str) -> bytes:
    """The bytes of the SQLite database `name` and of its WAL and shared-memory files."""
    return b"".join(p.read_bytes() for p in sorted(folder.glob(name + "*")))


def pems(db: Path) -> dict[str, str]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT kid, private_pem FROM signing_keys").fetchall())


def opens_with(pem: str, secret: KeySecret) -> bool:
    try:
        serialization.load_pem_private_key(pem.encode(), secret.value)
    except ValueError:
        return False
    return True


async def client_credentials_token(hub: RunningIdentity) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{local(hub)}/token",
            data={"grant_type": "client_credentials"},
            headers=basic("demo-web", demo_secret(hub)),
        ) as r,
    ):
        body = await r.json()
        assert r.status == 200, body
        return str(body["access_token"])


async def verifies(
    hub: RunningIdentity, token: str, seeded_by: RunningIdentity | None = None
) -> bool:
    """Checked as the gateway checks it (the JWKS) and as a client asks (introspection; the
    demo client's secret is the one the hub `seeded_by` set)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{local(hub)}/jwks.json") as r:
            jwks = await r.json()
        kid = jwt.get_unverified_header(token)["kid"]
        key = jwt.PyJWK(next(k for k in jwks["keys"] if k["kid"] == kid)).key
        jwt.decode(token, key, algorithms=["ES256"], audience="demo-web", issuer=ISSUER)
        async with http.post(
            f"{local(hub)}/introspect",
            data={"token": token},
            headers=basic("demo-web", demo_secret(seeded_by or hub)),
        ) as r:
            return bool((await r.json())["active"])


async def test_keys_land_encrypted_and_the_database_holds_no_plaintext_key(
    tmp_path: Path,
) -> None:
    async with running_hub(
        tmp_path, database_url=sqlite_url(tmp_path / "id.db"), key_secret=FIRST
    ) as hub:
        held = [hub.hub.keys.signing_key(alg=alg).private for alg in ("ES256", "RS256")]
    rows = pems(tmp_path / "id.db")
    assert len(rows) == 2
    assert all(pem.startswith(ENCRYPTED) and opens_with(pem, FIRST) for pem in rows.values())
    assert not any(opens_with(pem, SECOND) for pem in rows.values())
    database = database_files(tmp_path, "id.db")
    for private in held:
        der = private.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        body = base64.b64encode(der)
        assert body[:64].decode() not in "".join(rows.values())
        assert der not in database and body[:64] not in database
    ec_scalar = held[0].private_numbers().private_value.to_bytes(32, "big")
    assert ec_scalar not in database


async def test_a_restart_with_the_same_secret_keeps_the_keys_and_their_tokens(
    tmp_path: Path,
) -> None:
    db = tmp_path / "id.db"
    async with running_hub(tmp_path, database_url=sqlite_url(db), key_secret=FIRST) as hub:
        token = await client_credentials_token(hub)
        before = hub.hub.keys.jwks()
    rows = stored(db)
    async with running_hub(tmp_path, database_url=sqlite_url(db), key_secret=FIRST) as hub:
        assert hub.hub.keys.jwks() == before
        assert await verifies(hub, token)
        assert jwt.get_unverified_header(await client_credentials_token(hub)) == (
            jwt.get_unverified_header(token)
        )
    assert stored(db) == rows  # already sealed with the current secret: nothing rewritten


async def test_plain_keys_of_an_existing_database_are_encrypted_at_start_and_old_tokens_verify(
    tmp_path: Path,
) -> None:
    db = tmp_path / "id.db"
    # Before ADR 20 (and still without a secret): plain PKCS #8 in the column.
    async with running_hub(tmp_path, database_url=sqlite_url(db)) as hub:
        token = await client_credentials_token(hub)
    plain = pems(db)
    assert all(pem.startswith(PLAIN) for pem in plain.values())
    async with running_hub(tmp_path, database_url=sqlite_url(db), key_secret=FIRST) as hub:
        assert await verifies(hub, token)
        newer = await client_credentials_token(hub)
        assert jwt.get_unverified_header(newer)["kid"] == jwt.get_unverified_header(token)["kid"]
    sealed = pems(db)
    assert sealed.keys() == plain.keys()  # the same keys, not new ones
    assert all(pem.startswith(ENCRYPTED) and opens_with(pem, FIRST) for pem in sealed.values())
    for kid, pem in sealed.items():
        old = serialization.load_pem_private_key(plain[kid].encode(), None)
        new = serialization.load_pem_private_key(pem.encode(), FIRST.value)
        assert old.private_numbers() == new.private_numbers()  # type: ignore[union-attr]


async def test_a_wrong_secret_stops_the_hub_with_one_line_and_leaves_the_keys_alone(
    tmp_path: Path,
) -> None:
    db = tmp_path / "id.db"
    async with running_hub(tmp_path, database_url=sqlite_url(db), key_secret=FIRST):
        pass
    rows = stored(db)
    with pytest.raises(IdentityStartError) as wrong:
        async with running_hub(tmp_path, database_url=sqlite_url(db), key_secret=SECOND):
            pass
    message = str(wrong.value)
    assert "does not open with the key secret from the second secret" in message
    assert "\n" not in message and FIRST.value.decode() not in message
    with pytest.raises(IdentityStartError, match="encrypted but no key secret is set"):
        async with running_hub(tmp_path, database_url=sqlite_url(db)):
            pass
    assert stored(db) == rows  # no key made over them, none rewritten


async def test_a_secret_rotation_opens_keys_with_the_previous_secret_and_reseals_them(
    tmp_path: Path,
) -> None:
    db = tmp_path / "id.db"
    async with running_hub(tmp_path, database_url=sqlite_url(db), key_secret=FIRST) as hub:
        token = await client_credentials_token(hub)
    kids = set(pems(db))
    rotated = {"database_url": sqlite_url(db), "key_secret": SECOND}
    async with running_hub(tmp_path, **rotated, previous_key_secret=FIRST) as hub:
        assert await verifies(hub, token)
    after = pems(db)
    assert set(after) == kids
    assert all(opens_with(pem, SECOND) and not opens_with(pem, FIRST) for pem in after.values())
    async with running_hub(tmp_path, **rotated) as hub:  # the previous secret is no longer needed
        assert await verifies(hub, token)
    with pytest.raises(IdentityStartError, match="nor with the previous one from the first"):
        async with running_hub(
            tmp_path, database_url=sqlite_url(db), key_secret=FIRST, previous_key_secret=FIRST
        ):
            pass


async def test_a_previous_secret_without_a_current_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IdentityStartError, match="a previous key secret needs a current one"):
        async with running_hub(
            tmp_path, database_url=sqlite_url(tmp_path / "id.db"), previous_key_secret=FIRST
        ):
            pass


async def test_the_embedded_hub_generates_its_own_secret_next_to_its_database(
    tmp_path: Path,
) -> None:
    state = tmp_path / "identity"
    async with running_hub(tmp_path) as hub:
        token = await client_credentials_token(hub)
    secret_file = state / "key-secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    own = KeySecret.checked(secret_file.read_bytes(), "the generated file")
    sealed = pems(state / "identity.db")
    assert all(pem.startswith(ENCRYPTED) and opens_with(pem, own) for pem in sealed.values())
    async with running_hub(tmp_path) as hub:  # `cityplane up` again: the same secret, same keys
        assert await verifies(hub, token)
    assert pems(state / "identity.db") == sealed

    secret_file.unlink()  # lost: the hub must say so, not make a new secret and new keys
    rows = stored(state / "identity.db")
    with pytest.raises(IdentityStartError, match=r"key secret file .* is missing: restore it"):
        async with running_hub(tmp_path):
            pass
    assert stored(state / "identity.db") == rows
    assert not secret_file.exists()


async def test_an_embedded_database_from_before_gets_a_secret_then_moves_to_one_given(
    tmp_path: Path,
) -> None:
    db = tmp_path / "identity" / "identity.db"
    async with running_hub(tmp_path, database_url=sqlite_url(db)) as hub:  # plain, as before
        token = await client_credentials_token(hub)
    assert all(pem.startswith(PLAIN) for pem in pems(db).values())
    async with running_hub(tmp_path) as hub:
        assert await verifies(hub, token)
    own = KeySecret.checked((tmp_path / "identity" / "key-secret").read_bytes(), "the file")
    assert all(opens_with(pem, own) for pem in pems(db).values())

    # Moving to a secret of one's own: the generated one is the previous secret, once.
    async with running_hub(tmp_path, key_secret=FIRST, previous_key_secret=own) as hub:
        assert await verifies(hub, token)
    assert all(opens_with(pem, FIRST) for pem in pems(db).values())
    async with running_hub(tmp_path, key_secret=FIRST) as hub:
        assert await verifies(hub, token)


async def test_a_replica_without_the_new_secret_keeps_its_keys_and_never_seals_them_back(
    tmp_path: Path,
) -> None:
    engine = make_engine(sqlite_url(tmp_path / "id.db"))
    try:
        await migrate(engine, "identity:migrations", _MIGRATION_LOCK)
        old = KeyRing(engine, encryption=KeyEncryption(FIRST))
        await old.ensure()
        signing = old.signing_key()
        new = KeyRing(engine, encryption=KeyEncryption(SECOND, FIRST))
        await new.ensure()  # the rolled-out replica reseals every key with the new secret
        async with engine.connect() as conn:
            resealed = (await conn.execute(select(signing_keys.c.private_pem))).scalars().all()
        assert all(opens_with(pem, SECOND) for pem in resealed)

        await old.ensure()  # the old replica's next minute: no error, same key, nothing written
        assert old.signing_key().kid == signing.kid
        assert old.signing_key().private is signing.private
        async with engine.connect() as conn:
            after = (await conn.execute(select(signing_keys.c.private_pem))).scalars().all()
        assert after == resealed

        fresh = KeyRing(engine, encryption=KeyEncryption(FIRST))  # but a new start must fail
        with pytest.raises(KeySecretError, match="does not open"):
            await fresh.ensure()
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"too-short\n", "is 9 characters long; it needs at least 32"),
        (b"   \n", "is 0 characters long"),
        (b"x" * 1024, "longer than 1023 bytes"),
    ],
)
def test_an_unusable_secret_is_refused_with_the_reason(value: bytes, message: str) -> None:
    with pytest.raises(KeySecretError, match=message):
        KeySecret.checked(value, "a test")


def test_a_secret_never_shows_in_a_repr() -> None:
    assert FIRST.value.decode() not in repr(FIRST)


# The command line: what an operator meets.


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # No CITYPLANE_ setting of the machine leaks in: the key secret must come from `env`.
    return run_cli(*args, env=environment(env, without_prefix="CITYPLANE_"), timeout=60)


def secret_file(path: Path, secret: KeySecret) -> Path:
    path.write_bytes(secret.value + b"\n")
    path.chmod(0o600)
    return path


async def test_the_cli_refuses_a_wrong_key_secret_in_one_line_and_exits_3(tmp_path: Path) -> None:
    db = tmp_path / "id.db"
    async with running_hub(tmp_path, database_url=sqlite_url(db), key_secret=FIRST):
        pass
    rows = stored(db)
    wrong = secret_file(tmp_path / "wrong", SECOND)
    base = ["identity", "--port", "0", "--data-dir", str(tmp_path)]
    base += ["--database-url", sqlite_url(db)]
    result = await asyncio.to_thread(cli, *base, "--key-secret-file", str(wrong))
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("cityplane: signing key ")
    assert f"does not open with the key secret from --key-secret-file {wrong}" in line
    assert SECOND.value.decode() not in result.stderr
    assert stored(db) == rows

    result = await asyncio.to_thread(cli, *base)
    assert result.returncode == 3
    assert result.stderr.strip().splitlines() == [
        "cityplane: the signing keys are encrypted but no key secret is set: give the hub a key "
        "secret with --key-secret-file or CITYPLANE_KEY_SECRET"
    ]
    assert "Traceback" not in result.stderr
    assert stored(db) == rows


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--key-secret-file", "{dir}/nope"],
            {},
            "--key-secret-file {dir}/nope: No such file or directory",
        ),
        (
            ["--key-secret-file", "{dir}/first"],
            {"CITYPLANE_KEY_SECRET": SECOND.value.decode()},
            "give --key-secret-file or CITYPLANE_KEY_SECRET, not both",
        ),
        (
            [],
            {"CITYPLANE_KEY_SECRET": "short"},
            "the key secret from CITYPLANE_KEY_SECRET is 5 characters long",
        ),
        (
            ["--previous-key-secret-file", "{dir}/short"],
            {"CITYPLANE_KEY_SECRET": SECOND.value.decode()},
            "--previous-key-secret-file {dir}/short is 5 characters long",
        ),
    ],
)
def test_the_cli_refuses_unusable_key_secret_settings_in_one_line(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    secret_file(tmp_path / "first", FIRST)
    secret_file(tmp_path / "short", KeySecret(b"short", "a file"))
    flags = [a.replace("{dir}", str(tmp_path)) for a in args]
    result = cli("identity", "--port", "0", "--data-dir", str(tmp_path), *flags, env=env)
    assert result.returncode == 3, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert message.replace("{dir}", str(tmp_path)) in line
    assert "Traceback" not in result.stderr


async def test_the_cli_takes_the_secret_from_the_environment_and_seals_plain_keys(
    tmp_path: Path,
) -> None:
    db = tmp_path / "id.db"
    async with running_hub(tmp_path, database_url=sqlite_url(db)):
        pass
    assert all(pem.startswith(PLAIN) for pem in pems(db).values())
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "cityplane.cli", "identity", "--port", "0"),
            *("--data-dir", str(tmp_path), "--database-url", sqlite_url(db)),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("CITYPLANE_")}
        | {"CITYPLANE_KEY_SECRET": FIRST.value.decode()},
    )
    try:
        deadline = time.monotonic() + 30
        while not all(p.startswith(ENCRYPTED) for p in pems(db).values()):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the keys were not sealed"
            await asyncio.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(proc.communicate, timeout=20)
    assert all(opens_with(pem, FIRST) for pem in pems(db).values())
    assert "stored unencrypted" not in stderr


async def test_without_a_secret_on_a_database_url_the_hub_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="identity.app"):
        async with running_hub(tmp_path, database_url=sqlite_url(tmp_path / "id.db")):
            pass
    warnings = [r.getMessage() for r in caplog.records if r.name == "identity.app"]
    assert len(warnings) == 1
    assert "signing keys are stored unencrypted" in warnings[0]
    assert "--key-secret-file or CITYPLANE_KEY_SECRET" in warnings[0]


# PostgreSQL: replicas share the keys, so they share the sealing too.


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    if not await postgres_available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not running (CI promises one)")
        pytest.skip("PostgreSQL is not running")
    async with postgres_database() as url:
        yield url


async def pg_pems(url: str) -> dict[str, str]:
    return {r["kid"]: r["private_pem"] for r in await sql(url, "SELECT * FROM signing_keys")}


async def test_replicas_on_postgresql_seal_plain_keys_once_and_rotate_the_secret(
    tmp_path: Path, postgres_url: str
) -> None:
    token_file = tmp_path / "admin-token"
    common = {"database_url": postgres_url, "admin_token_file": token_file}
    async with running_hub(tmp_path / "before", **common) as hub:
        token = await client_credentials_token(hub)
    plain = await pg_pems(postgres_url)
    assert len(plain) == 2 and all(pem.startswith(PLAIN) for pem in plain.values())

    # Two replicas start together with the secret: one set of keys, each sealed once.
    a, b = await asyncio.gather(
        start_identity(
            IdentitySettings(
                port=0,
                data_dir=tmp_path / "a",
                issuer=ISSUER,
                demo=True,
                key_secret=FIRST,
                **common,
            )
        ),
        start_identity(
            IdentitySettings(
                port=0, data_dir=tmp_path / "b", issuer=ISSUER, key_secret=FIRST, **common
            )
        ),
    )
    try:
        assert await verifies(a, token)
        assert await verifies(b, token, seeded_by=a)
        assert a.hub.keys.jwks() == b.hub.keys.jwks()
    finally:
        await a.stop()
        await b.stop()
    sealed = await pg_pems(postgres_url)
    assert sealed.keys() == plain.keys()
    assert all(pem.startswith(ENCRYPTED) and opens_with(pem, FIRST) for pem in sealed.values())

    async with running_hub(
        tmp_path / "rotated", key_secret=SECOND, previous_key_secret=FIRST, **common
    ) as hub:
        assert await verifies(hub, token)
    rotated = await pg_pems(postgres_url)
    assert rotated.keys() == plain.keys()
    assert all(opens_with(pem, SECOND) and not opens_with(pem, FIRST) for pem in rotated.values())
    with pytest.raises(IdentityStartError, match="does not open with the key secret"):
        async with running_hub(tmp_path / "stale", key_secret=FIRST, **common):
            pass
    assert await pg_pems(postgres_url) == rotated
    # Stored JSON and columns other than the key are untouched by sealing.
    rows = await sql(postgres_url, "SELECT kid, alg, public_jwk FROM signing_keys")
    assert {r["kid"] for r in rows} == set(plain)
    assert all(json.loads(r["public_jwk"])["kid"] == r["kid"] for r in rows)
