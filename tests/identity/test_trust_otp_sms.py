"""TOTP (RFC 6238) codes and SMS challenges: windows, replay, attempts, expiry, the outbox."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import stat
import struct
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from identity.trust.otp import new_totp_secret, provisioning_uri, qr_svg, verify_totp
from identity.trust.sms import (
    MAX_ATTEMPTS,
    InvalidPhone,
    LogSender,
    OutboxSender,
    SmsChallenge,
    mask_phone,
    normalize_phone,
)

# RFC 6238 Appendix B: the SHA-1 test secret is ASCII "12345678901234567890".
RFC_SECRET = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"
NOW = 1_800_000_015.0  # 15 s into a 30 s step


def reference_totp(secret_ascii: bytes, step: int) -> str:
    """RFC 6238 §4 / RFC 4226 §5.3, written out here independently of pyotp."""
    mac = hmac.new(secret_ascii, struct.pack(">Q", step), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    number = struct.unpack(">I", mac[offset : offset + 4])[0] & 0x7FFFFFFF
    return f"{number % 10**6:06d}"


def code_at(step: int) -> str:
    return reference_totp(b"12345678901234567890", step)


@pytest.mark.parametrize(("t", "expected"), [(59, "287082"), (1111111109, "081804")])
def test_totp_matches_the_rfc_6238_test_vectors(t: int, expected: str) -> None:
    # Appendix B lists 8-digit codes; the 6-digit code is their last six digits.
    assert verify_totp(RFC_SECRET, expected, now=t, last_step=None) == t // 30


@pytest.mark.parametrize(
    ("offset", "accepted"), [(-2, False), (-1, True), (0, True), (1, True), (2, False)]
)
def test_totp_accepts_one_step_of_drift_either_way(offset: int, accepted: bool) -> None:
    step = int(NOW // 30) + offset
    result = verify_totp(RFC_SECRET, code_at(step), now=NOW, last_step=None)
    assert result == (step if accepted else None)


def test_a_totp_code_cannot_be_used_twice() -> None:
    step = int(NOW // 30)
    accepted = verify_totp(RFC_SECRET, code_at(step), now=NOW, last_step=None)
    assert accepted == step
    assert verify_totp(RFC_SECRET, code_at(step), now=NOW + 5, last_step=accepted) is None
    # Nor can an older code still inside the drift window.
    assert verify_totp(RFC_SECRET, code_at(step - 1), now=NOW, last_step=accepted) is None
    assert verify_totp(RFC_SECRET, code_at(step + 1), now=NOW + 30, last_step=accepted) == step + 1


@pytest.mark.parametrize(
    "code", ["", "12345", "1234567", "abcdef", "12 34 5x", "\uff11\uff12\uff13\uff14\uff15\uff16"]
)
def test_malformed_totp_codes_are_refused(code: str) -> None:
    assert verify_totp(RFC_SECRET, code, now=NOW, last_step=None) is None


def test_a_code_typed_with_spaces_is_accepted() -> None:
    code = code_at(int(NOW // 30))
    assert verify_totp(RFC_SECRET, f"{code[:3]} {code[3:]}", now=NOW, last_step=None) is not None


def test_enrollment_uri_and_qr_code() -> None:
    secret = new_totp_secret()
    assert len(secret) == 32 and secret != new_totp_secret()
    uri = provisioning_uri(secret, "alice@example.org", "CityPlane")
    parsed = urlparse(uri)
    assert parsed.scheme == "otpauth" and parsed.netloc == "totp"
    assert parse_qs(parsed.query) == {"secret": [secret], "issuer": ["CityPlane"]}
    svg = qr_svg(uri)
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert "<?xml" not in svg


def test_an_sms_code_verifies_once() -> None:
    challenge, code = SmsChallenge.issue("+8613812345678", now=NOW)
    assert len(code) == 6 and code.isdigit()
    assert code not in json.dumps(challenge.to_dict())
    assert challenge.verify(code, now=NOW + 10)
    assert not challenge.verify(code, now=NOW + 11)


def test_an_sms_code_expires() -> None:
    challenge, code = SmsChallenge.issue("+8613812345678", now=NOW, ttl=60)
    assert not challenge.verify(code, now=NOW + 60)


def test_an_sms_challenge_allows_five_attempts() -> None:
    challenge, code = SmsChallenge.issue("+8613812345678", now=NOW)
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    for _ in range(MAX_ATTEMPTS - 1):
        assert not challenge.verify(wrong, now=NOW)
    assert challenge.verify(code, now=NOW)

    challenge, code = SmsChallenge.issue("+8613812345678", now=NOW)
    for _ in range(MAX_ATTEMPTS):
        assert not challenge.verify(wrong, now=NOW)
    assert challenge.exhausted
    assert not challenge.verify(code, now=NOW)


def test_an_sms_challenge_survives_a_round_trip_through_json() -> None:
    challenge, code = SmsChallenge.issue("+8613812345678", now=NOW)
    assert not challenge.verify("000000" if code != "000000" else "111111", now=NOW)
    stored = json.loads(json.dumps(challenge.to_dict()))
    restored = SmsChallenge.from_dict(stored)
    assert restored.attempts == 1
    assert restored.verify(code, now=NOW)


def test_an_sms_challenge_is_bound_to_its_phone() -> None:
    challenge, code = SmsChallenge.issue("+8613812345678", now=NOW)
    moved = SmsChallenge.from_dict({**challenge.to_dict(), "phone": "+8613900000000"})
    assert not moved.verify(code, now=NOW)


def test_codes_are_spread_over_all_six_digits() -> None:
    codes = {SmsChallenge.issue("+8613812345678", now=NOW)[1] for _ in range(200)}
    assert len(codes) > 190
    assert {c[0] for c in codes} >= set("0123456789")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("13812345678", "+8613812345678"),
        ("138-1234-5678", "+8613812345678"),
        ("+86 138 1234 5678", "+8613812345678"),
        ("008613812345678", "+8613812345678"),
        ("+44 20 7946 0958", "+442079460958"),
        ("+1 (415) 555-2671", "+14155552671"),
    ],
)
def test_phone_numbers_are_normalized_to_e164(text: str, expected: str) -> None:
    assert normalize_phone(text) == expected


@pytest.mark.parametrize(
    "text", ["", "12345", "23812345678", "+0123456789", "+8612345", "+1234567890123456", "tel:1"]
)
def test_bad_phone_numbers_are_refused(text: str) -> None:
    with pytest.raises(InvalidPhone):
        normalize_phone(text)


@pytest.mark.parametrize(
    ("phone", "masked"),
    [
        ("13812345678", "138****5678"),
        ("+8613812345678", "+86138****5678"),
        ("+442079460958", "+4420****0958"),
        ("12345", "***45"),
    ],
)
def test_masked_phone_numbers_hide_the_middle_digits(phone: str, masked: str) -> None:
    assert mask_phone(phone) == masked


async def test_the_outbox_gets_one_json_line_per_message_and_is_private(tmp_path: Path) -> None:
    outbox = tmp_path / "spool" / "sms.jsonl"
    sender = OutboxSender(outbox)
    await asyncio.gather(*(sender.send("+8613812345678", f"验证码 {i:06d}") for i in range(50)))
    lines = outbox.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 50
    messages = [json.loads(line) for line in lines]
    assert {m["text"] for m in messages} == {f"验证码 {i:06d}" for i in range(50)}
    assert all(set(m) == {"at", "phone", "text"} for m in messages)
    assert stat.S_IMODE(outbox.stat().st_mode) == 0o600


async def test_the_log_sender_masks_the_phone(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        await LogSender().send("+8613812345678", "code 123456")
    assert "+86138****5678" in caplog.text
    assert "13812345678" not in caplog.text
    assert "123456" in caplog.text
