"""Real-person (face) results: signed, bound to subject and nonce, fresh, safe algorithms only."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from identity.trust.realperson import (
    FACE_RESULT_TYP,
    DevFaceMatcher,
    FaceMatcher,
    FaceResultInvalid,
    verify_face_result,
)

KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 2000
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 2000
RID = "f" * 64


async def face_token(matcher: FaceMatcher, image: bytes = JPEG, **overrides: Any) -> str:
    args = {"subject": "person-1", "resident_id_fingerprint": RID, "image": image, "nonce": "n-1"}
    return await matcher.match(**{**args, **overrides})


def check(token: str, keys: Any = None, **overrides: Any) -> Any:
    args: dict[str, Any] = {
        "keys": keys if keys is not None else KEY.public_key(),
        "subject": "person-1",
        "nonce": "n-1",
        "now": time.time(),
    }
    return verify_face_result(token, **{**args, **overrides})


@pytest.mark.parametrize(("image", "matched"), [(JPEG, True), (PNG, True)])
async def test_a_photo_matches_and_the_signed_result_verifies(image: bytes, matched: bool) -> None:
    token = await face_token(DevFaceMatcher(KEY), image)
    result = check(token, resident_id_fingerprint=RID, issuer="cityplane-dev-face")
    assert result.matched is matched
    assert 0.9 < result.score <= 1.0
    assert abs(result.issued_at - time.time()) < 5


@pytest.mark.parametrize("image", [b"", JPEG[:500], b"GIF89a" + b"\x00" * 2000, b"\x00" * 4096])
async def test_anything_but_a_photo_is_a_signed_non_match(image: bytes) -> None:
    result = check(await face_token(DevFaceMatcher(KEY), image))
    assert result.matched is False and result.score < 0.5


async def test_a_custom_accept_rule_decides_the_match() -> None:
    matcher = DevFaceMatcher(KEY, accept=lambda image: image == b"me")
    assert check(await face_token(matcher, b"me")).matched
    assert not check(await face_token(matcher, JPEG)).matched


async def test_results_verify_against_the_matchers_jwks() -> None:
    matcher = DevFaceMatcher(KEY, kid="k1")
    token = await face_token(matcher)
    assert check(token, keys=matcher.public_jwks()).matched
    other = DevFaceMatcher(OTHER_KEY, kid="k2").public_jwks()
    with pytest.raises(FaceResultInvalid, match="no verification key 'k1'"):
        check(token, keys=other)
    both = {"keys": [*other["keys"], *matcher.public_jwks()["keys"]]}
    assert check(token, keys=both).matched


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"subject": "person-2"}, "another subject"),
        ({"nonce": "n-2"}, "nonce"),
        ({"now": 301}, "older than 300s"),
        ({"now": -120}, "future"),
        ({"issuer": "national-face"}, "issuer"),
        ({"resident_id_fingerprint": "0" * 64}, "another resident ID"),
    ],
)
async def test_results_for_another_subject_attempt_or_time_are_refused(
    overrides: dict[str, Any], message: str
) -> None:
    token = await face_token(DevFaceMatcher(KEY))
    if "now" in overrides:  # seconds from now, so collection time does not matter
        overrides = {**overrides, "now": time.time() + overrides["now"]}
    with pytest.raises(FaceResultInvalid, match=message):
        check(token, **overrides)


async def test_a_result_signed_by_another_key_or_altered_is_refused() -> None:
    with pytest.raises(FaceResultInvalid, match="signature"):
        check(await face_token(DevFaceMatcher(OTHER_KEY)))
    token = await face_token(DevFaceMatcher(KEY), b"not a photo")
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["matched"] = True
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(FaceResultInvalid, match="signature"):
        check(f"{header}.{forged}.{signature}")


def claims_now() -> dict[str, Any]:
    return {"sub": "person-1", "nonce": "n-1", "iat": int(time.time()), "matched": True}


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_an_unsigned_result_is_refused() -> None:
    token = jwt.encode(claims_now(), None, algorithm="none", headers={"typ": FACE_RESULT_TYP})
    with pytest.raises(FaceResultInvalid, match="'none' is not allowed"):
        check(token)


def test_hs256_signed_with_the_public_key_is_refused() -> None:
    # The classic confusion attack: the verifier's public key used as an HMAC secret.
    public_pem = KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # PyJWT refuses to make such a token, so it is made by hand.
    header = b64({"alg": "HS256", "typ": FACE_RESULT_TYP})
    payload = b64(claims_now())
    mac = hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    token = f"{header}.{payload}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    with pytest.raises(FaceResultInvalid, match="'HS256' is not allowed"):
        check(token)
    with pytest.raises(ValueError, match="may not be accepted"):
        check(token, algorithms=["HS256", "ES256"])


def test_an_rs256_result_checked_with_an_ec_key_is_refused() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims_now(), rsa_key, algorithm="RS256", headers={"typ": FACE_RESULT_TYP})
    assert check(token, keys=rsa_key.public_key()).matched
    with pytest.raises(FaceResultInvalid):
        check(token)


def test_a_result_without_the_face_result_type_is_refused() -> None:
    token = jwt.encode(claims_now(), KEY, algorithm="ES256", headers={"typ": "at+jwt"})
    with pytest.raises(FaceResultInvalid, match="type"):
        check(token)
    assert check(token, typ=None).matched


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "e30.e30.e30"])
def test_garbage_is_refused(token: str) -> None:
    with pytest.raises(FaceResultInvalid):
        check(token)
