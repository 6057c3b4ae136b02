"""Passwords: argon2id with OWASP parameters, off the event loop; NIST new-password rules."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from identity.trust.password import PasswordHasher, check_new_password, common_passwords

HASHER = PasswordHasher()


async def test_a_hash_verifies_its_password_and_nothing_else() -> None:
    encoded = await HASHER.hash("correct horse battery staple")
    assert encoded.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert await HASHER.verify(encoded, "correct horse battery staple")
    assert not await HASHER.verify(encoded, "correct horse battery stapler")
    assert not await HASHER.verify(encoded, "")


async def test_two_hashes_of_one_password_differ_by_their_salt() -> None:
    assert await HASHER.hash("same password") != await HASHER.hash("same password")


@pytest.mark.parametrize(
    "encoded", ["", "not a hash", "$argon2id$v=19$m=19456,t=2,p=1$bad", "$2b$"]
)
async def test_an_unreadable_hash_verifies_nothing_and_does_not_raise(encoded: str) -> None:
    assert not await HASHER.verify(encoded, "anything")
    assert HASHER.needs_rehash(encoded)


async def test_the_same_password_typed_in_another_unicode_form_verifies() -> None:
    # "é" as one code point and as e + combining accent; full-width digits.
    encoded = await HASHER.hash("caf\u00e9 au lait 12")
    assert await HASHER.verify(encoded, "cafe\u0301 au lait \uff11\uff12")


async def test_hashes_made_with_weaker_parameters_need_a_rehash() -> None:
    weak = PasswordHasher(time_cost=1, memory_cost=8 * 1024)
    encoded = await weak.hash("an old password")
    assert HASHER.needs_rehash(encoded)
    assert await HASHER.verify(encoded, "an old password")
    assert not HASHER.needs_rehash(await HASHER.hash("an old password"))
    weak.close()


async def test_an_unknown_user_takes_about_as_long_as_a_wrong_password() -> None:
    encoded = await HASHER.hash("the real one")
    await HASHER.verify_missing_user()  # the dummy hash is made once, on first use

    async def timed(coro: object) -> float:
        start = time.perf_counter()
        await coro  # type: ignore[misc]
        return time.perf_counter() - start

    wrong = min([await timed(HASHER.verify(encoded, "guess")) for _ in range(3)])
    missing = min([await timed(HASHER.verify_missing_user("guess")) for _ in range(3)])
    assert await HASHER.verify_missing_user("the real one") is False
    assert 0.3 < missing / wrong < 3.0


async def test_hashing_leaves_the_event_loop_free() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    await asyncio.gather(*(HASHER.hash(f"password {i}") for i in range(4)))
    task.cancel()
    assert ticks >= 3


async def test_a_flood_of_hashes_runs_at_most_concurrency_at_once() -> None:
    hasher = PasswordHasher(concurrency=2, time_cost=1, memory_cost=8 * 1024)
    real_hash = hasher._hash_sync
    active = peak = 0
    lock = threading.Lock()

    def counting_hash(password: str) -> str:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        try:
            time.sleep(0.01)
            return real_hash(password)
        finally:
            with lock:
                active -= 1

    hasher._hash_sync = counting_hash  # type: ignore[method-assign]
    hashes = await asyncio.gather(*(hasher.hash(f"password {i}") for i in range(12)))
    hasher.close()
    assert len(set(hashes)) == 12
    assert peak == 2


@pytest.mark.parametrize(
    ("password", "username", "reason"),
    [
        ("short", None, "at least 8"),
        ("x" * 257, None, "at most 256"),
        ("password", None, "too common"),
        ("Password1", None, "too common"),
        ("WOAINI1314", None, "too common"),
        ("qwerty123", None, "too common"),
        ("alice-in-chains", "Alice", "username"),
        ("zhangsan99", "zhangsan", "username"),
        ("zzzzzzzzzz", None, "single character"),
        ("mycityplane!", None, "name of this service"),
        ("23456789", None, "sequence"),
        ("hgfedcba", None, "sequence"),
    ],
)
def test_weak_new_passwords_are_refused_with_a_reason(
    password: str, username: str | None, reason: str
) -> None:
    result = check_new_password(password, username=username)
    assert result is not None
    assert reason in result


@pytest.mark.parametrize(
    ("password", "username"),
    [
        ("correct horse battery staple", "alice"),
        ("tr0ub4dor&3x", None),
        ("长城在北方很长很长", None),
        ("exactly8", "al"),
        ("y" * 255 + "z", None),
    ],
)
def test_ordinary_good_passwords_are_accepted(password: str, username: str | None) -> None:
    assert check_new_password(password, username=username) is None


def test_the_bundled_common_password_list_is_loaded_once_and_large_enough() -> None:
    assert common_passwords() is common_passwords()
    assert len(common_passwords()) >= 300
    assert "123456" in common_passwords()
