"""Passkeys: identity.trust.passkey verifying real ceremonies.

Two kinds of authenticator: Chromium's virtual WebAuthn authenticator behind the real
``passkey.js`` on a page served by a small aiohttp app (the browser tests), and a software
authenticator written here that signs whatever it is told to (the unit tests: counters,
foreign RP IDs and missing flags a well-behaved browser never produces).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import struct
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from playwright.async_api import Page, Route, expect
from webauthn.helpers import encode_cbor

import identity.web
from identity.trust.passkey import (
    PasskeyError,
    RelyingParty,
    StoredPasskey,
    authentication_options,
    credential_id_of,
    registration_options,
    user_handle_of,
    verify_authentication,
    verify_registration,
)

pytest.register_assert_rewrite("tests.browser")  # before the import: it is a pytest plugin too
from tests.browser import (  # noqa: E402
    LiveServer,
    Serve,
    VirtualAuthenticator,
    virtual_authenticator,
)

# The browser fixtures (chromium, chromium_browser, page, live_server) of the harness.
pytest_plugins = ["tests.browser"]

PASSKEY_JS = Path(identity.web.__file__).parent / "static" / "passkey.js"
ORIGIN = "https://id.city.example"
RP = RelyingParty(id="id.city.example", name="CityPlane", origins=(ORIGIN,))
ADA = b"ada-user-handle-0001"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- a software authenticator ------------------------------------------------------------

UP, UV, AT = 0x01, 0x04, 0x40  # authenticator data flags, WebAuthn L3 §6.1


@dataclass
class SoftAuthenticator:
    """An ES256 authenticator in Python; each answer can be bent the way a test needs."""

    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    credential_id: bytes = field(default_factory=lambda: os.urandom(16))
    counter: int = 0
    user_handle: bytes | None = None

    def _cose_key(self) -> bytes:
        numbers = self.key.public_key().public_numbers()
        # RFC 9053 §7.1.1: kty EC2 (2), alg ES256 (-7), crv P-256 (1), x, y.
        return encode_cbor(
            {
                1: 2,
                3: -7,
                -1: 1,
                -2: numbers.x.to_bytes(32, "big"),
                -3: numbers.y.to_bytes(32, "big"),
            }
        )

    @staticmethod
    def _client_data(kind: str, options: str, origin: str) -> bytes:
        challenge = json.loads(options)["challenge"]
        return json.dumps({"type": kind, "challenge": challenge, "origin": origin}).encode()

    def create(
        self, options: str, *, origin: str = ORIGIN, rp_id: str = RP.id, verified: bool = True
    ) -> dict[str, Any]:
        self.user_handle = unb64url(json.loads(options)["user"]["id"])
        flags = UP | AT | (UV if verified else 0)
        attested = bytes(16) + struct.pack(">H", len(self.credential_id)) + self.credential_id
        auth_data = (
            hashlib.sha256(rp_id.encode()).digest()
            + struct.pack(">BI", flags, self.counter)
            + attested
            + self._cose_key()
        )
        attestation = encode_cbor({"fmt": "none", "attStmt": {}, "authData": auth_data})
        return {
            "id": b64url(self.credential_id),
            "rawId": b64url(self.credential_id),
            "type": "public-key",
            "response": {
                "clientDataJSON": b64url(self._client_data("webauthn.create", options, origin)),
                "attestationObject": b64url(attestation),
                "transports": ["internal"],
            },
        }

    def get(
        self,
        options: str,
        *,
        origin: str = ORIGIN,
        rp_id: str = RP.id,
        verified: bool = True,
        counter: int | None = None,
    ) -> dict[str, Any]:
        self.counter = self.counter + 1 if counter is None else counter
        flags = UP | (UV if verified else 0)
        auth_data = hashlib.sha256(rp_id.encode()).digest() + struct.pack(
            ">BI", flags, self.counter
        )
        client_data = self._client_data("webauthn.get", options, origin)
        signature = self.key.sign(
            auth_data + hashlib.sha256(client_data).digest(), ec.ECDSA(hashes.SHA256())
        )
        return {
            "id": b64url(self.credential_id),
            "rawId": b64url(self.credential_id),
            "type": "public-key",
            "response": {
                "clientDataJSON": b64url(client_data),
                "authenticatorData": b64url(auth_data),
                "signature": b64url(signature),
                "userHandle": b64url(self.user_handle) if self.user_handle else None,
            },
        }


def registered(authenticator: SoftAuthenticator) -> StoredPasskey:
    options, challenge = registration_options(RP, user_id=ADA, user_name="ada", display_name="Ada")
    return verify_registration(
        RP, credential_json=authenticator.create(options), challenge=challenge, now=1000.0
    )


def reason_of_failed_login(
    authenticator: SoftAuthenticator, stored: StoredPasskey, **bend: Any
) -> str:
    options, challenge = authentication_options(RP)
    answer = authenticator.get(options, **bend)
    with pytest.raises(PasskeyError) as failure:
        verify_authentication(
            RP, credential_json=answer, challenge=challenge, stored=stored, now=2000.0
        )
    return failure.value.reason


# --- unit tests ----------------------------------------------------------------------------


def test_registration_options_ask_for_a_discoverable_credential_with_user_verification() -> None:
    options_json, challenge = registration_options(
        RP, user_id=ADA, user_name="ada", display_name="Ada Lovelace", exclude=[b"old-key"]
    )
    options = json.loads(options_json)
    assert unb64url(options["challenge"]) == challenge and len(challenge) >= 16
    assert options["rp"] == {"id": "id.city.example", "name": "CityPlane"}
    assert unb64url(options["user"]["id"]) == ADA
    assert options["authenticatorSelection"]["residentKey"] == "preferred"
    assert options["authenticatorSelection"]["userVerification"] == "required"
    assert [unb64url(c["id"]) for c in options["excludeCredentials"]] == [b"old-key"]


def test_every_ceremony_gets_a_fresh_challenge() -> None:
    challenges = {authentication_options(RP)[1] for _ in range(20)}
    assert len(challenges) == 20


def test_usernameless_login_options_allow_any_credential() -> None:
    options = json.loads(authentication_options(RP)[0])
    assert options.get("allowCredentials", []) == []
    assert options["userVerification"] == "required"
    assert options["rpId"] == "id.city.example"
    listed = json.loads(authentication_options(RP, allow=[b"k1"])[0])
    assert [unb64url(c["id"]) for c in listed["allowCredentials"]] == [b"k1"]


def test_registration_returns_the_passkey_to_store() -> None:
    authenticator = SoftAuthenticator()
    stored = registered(authenticator)
    assert stored.credential_id == authenticator.credential_id
    assert stored.sign_count == 0 and stored.transports == ["internal"]
    assert stored.created_at == 1000.0 and stored.last_used_at is None
    assert stored.device_type == "single_device" and not stored.backed_up
    assert stored.amr() == ("hwk", "user", "mfa")


def test_login_updates_sign_count_and_last_use() -> None:
    authenticator = SoftAuthenticator()
    stored = registered(authenticator)
    options, challenge = authentication_options(RP)
    answer = authenticator.get(options)
    assert credential_id_of(answer) == stored.credential_id
    assert user_handle_of(json.dumps(answer)) == ADA
    after = verify_authentication(
        RP,
        credential_json=json.dumps(answer),
        challenge=challenge,
        stored=stored,
        now=2000.0,
        expected_user_handle=ADA,
    )
    assert after.sign_count == 1 and after.last_used_at == 2000.0
    assert after.created_at == stored.created_at


def test_sign_count_going_backwards_is_refused_as_a_cloned_authenticator() -> None:
    authenticator = SoftAuthenticator()
    stored = replace(registered(authenticator), sign_count=7)
    assert reason_of_failed_login(authenticator, stored, counter=5) == "sign_count"
    assert reason_of_failed_login(authenticator, stored, counter=7) == "sign_count"


def test_authenticators_that_never_count_can_log_in_again() -> None:
    # Both counts zero: the authenticator does not implement a counter (WebAuthn L3 §6.1.1).
    authenticator = SoftAuthenticator()
    stored = registered(authenticator)
    for _ in range(2):
        options, challenge = authentication_options(RP)
        answer = authenticator.get(options, counter=0)
        stored = verify_authentication(
            RP, credential_json=answer, challenge=challenge, stored=stored, now=1.0
        )
    assert stored.sign_count == 0


def test_an_answer_verified_once_does_not_verify_twice() -> None:
    authenticator = SoftAuthenticator()
    stored = registered(authenticator)
    options, challenge = authentication_options(RP)
    answer = authenticator.get(options)
    stored = verify_authentication(
        RP, credential_json=answer, challenge=challenge, stored=stored, now=1.0
    )
    with pytest.raises(PasskeyError) as failure:
        verify_authentication(
            RP, credential_json=answer, challenge=challenge, stored=stored, now=2.0
        )
    assert failure.value.reason == "sign_count"


def test_answer_to_another_challenge_is_refused() -> None:
    authenticator = SoftAuthenticator()
    stored = registered(authenticator)
    options, _ = authentication_options(RP)
    _, other_challenge = authentication_options(RP)
    with pytest.raises(PasskeyError) as failure:
        verify_authentication(
            RP,
            credential_json=authenticator.get(options),
            challenge=other_challenge,
            stored=stored,
            now=1.0,
        )
    assert failure.value.reason == "challenge"


def test_assertion_made_on_another_origin_is_refused() -> None:
    authenticator = SoftAuthenticator()
    stored = registered(authenticator)
    phishing = reason_of_failed_login(authenticator, stored, origin="https://id.city.example.evil")
    assert phishing == "origin"


def test_assertion_for_another_rp_id_is_refused() -> None:
    authenticator = SoftAuthenticator()
    stored = registered(authenticator)
    assert reason_of_failed_login(authenticator, stored, rp_id="city.example") == "rp_id"


@pytest.mark.parametrize(
    ("bend", "reason"),
    [({"rp_id": "evil.example"}, "rp_id"), ({"origin": "https://evil.example"}, "origin")],
)
def test_registration_for_another_rp_id_or_origin_is_refused(
    bend: dict[str, Any], reason: str
) -> None:
    options, challenge = registration_options(RP, user_id=ADA, user_name="ada", display_name="Ada")
    answer = SoftAuthenticator().create(options, **bend)
    with pytest.raises(PasskeyError) as failure:
        verify_registration(RP, credential_json=answer, challenge=challenge, now=1.0)
    assert failure.value.reason == reason


def test_registration_without_user_verification_is_refused() -> None:
    options, challenge = registration_options(RP, user_id=ADA, user_name="ada", display_name="Ada")
    answer = SoftAuthenticator().create(options, verified=False)
    with pytest.raises(PasskeyError) as failure:
        verify_registration(RP, credential_json=answer, challenge=challenge, now=1.0)
    assert failure.value.reason == "user_verification"
    assert "verif" in str(failure.value) and "flags" not in str(failure.value)


def test_login_without_user_verification_is_refused() -> None:
    authenticator = SoftAuthenticator()
    stored = registered(authenticator)
    assert reason_of_failed_login(authenticator, stored, verified=False) == "user_verification"


def test_signature_from_another_key_is_refused() -> None:
    authenticator = SoftAuthenticator()
    stored = registered(authenticator)
    impostor = SoftAuthenticator(credential_id=authenticator.credential_id, user_handle=ADA)
    assert reason_of_failed_login(impostor, stored) == "signature"


def test_answer_for_another_account_or_credential_is_refused() -> None:
    authenticator = SoftAuthenticator()
    stored = registered(authenticator)
    options, challenge = authentication_options(RP)
    answer = authenticator.get(options)
    with pytest.raises(PasskeyError) as failure:
        verify_authentication(
            RP,
            credential_json=answer,
            challenge=challenge,
            stored=stored,
            now=1.0,
            expected_user_handle=b"someone-else",
        )
    assert failure.value.reason == "user_handle"
    other = replace(stored, credential_id=b"another-credential")
    with pytest.raises(PasskeyError) as failure:
        verify_authentication(
            RP, credential_json=answer, challenge=challenge, stored=other, now=1.0
        )
    assert failure.value.reason == "credential"


@pytest.mark.parametrize(
    "garbage",
    ["not json", "[]", "{}", {"rawId": "!!!"}, {"rawId": 7, "response": {}}, b"\xff"],
)
def test_malformed_answers_are_refused_with_a_safe_message(garbage: Any) -> None:
    _, challenge = registration_options(RP, user_id=ADA, user_name="ada", display_name="Ada")
    with pytest.raises(PasskeyError) as failure:
        verify_registration(RP, credential_json=garbage, challenge=challenge, now=1.0)
    assert failure.value.reason == "malformed"
    assert str(failure.value) == "The passkey answer could not be read. Please try again."
    with pytest.raises(PasskeyError):
        credential_id_of(garbage)


def test_registration_with_a_corrupt_attestation_object_is_malformed() -> None:
    options, challenge = registration_options(RP, user_id=ADA, user_name="ada", display_name="Ada")
    answer = SoftAuthenticator().create(options)
    answer["response"]["attestationObject"] = b64url(b"\xa1not cbor")
    with pytest.raises(PasskeyError) as failure:
        verify_registration(RP, credential_json=answer, challenge=challenge, now=1.0)
    assert failure.value.reason == "malformed"


def test_answer_with_a_readable_id_but_no_response_is_refused() -> None:
    answer = {"id": "eA", "rawId": "eA", "type": "public-key", "response": {}}
    _, challenge = registration_options(RP, user_id=ADA, user_name="ada", display_name="Ada")
    with pytest.raises(PasskeyError) as failure:
        verify_registration(RP, credential_json=answer, challenge=challenge, now=1.0)
    assert failure.value.reason == "malformed"
    assert credential_id_of(answer) == b"x" and user_handle_of(answer) is None


def test_relying_party_origins_may_be_its_rp_id_or_subdomains() -> None:
    rp = RelyingParty(
        id="city.example", name="x", origins=("https://id.city.example", "https://city.example")
    )
    assert rp.origins == ("https://id.city.example", "https://city.example")


@pytest.mark.parametrize(
    "bad",
    [
        {"id": "city.example", "origins": ("https://city.example.evil",)},
        {"id": "https://city.example", "origins": ("https://city.example",)},
        {"id": "city.example", "origins": ()},
    ],
)
def test_relying_party_origins_must_be_on_its_rp_id(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RelyingParty(name="x", **bad)


# --- in real Chromium ----------------------------------------------------------------------


@dataclass
class PasskeySite:
    """A tiny relying party: one account, ``ada``, and the passkey ceremonies of passkey.js."""

    rp: RelyingParty | None = None
    challenges: dict[str, bytes] = field(default_factory=dict)
    passkeys: dict[bytes, StoredPasskey] = field(default_factory=dict)
    answers: list[dict[str, Any]] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.home)
        app.router.add_get("/welcome", self.welcome)
        app.router.add_get("/static/passkey.js", self.script)
        app.router.add_post("/register/options", self.register_options)
        app.router.add_post("/register", self.register)
        app.router.add_post("/login/options", self.login_options)
        app.router.add_post("/login", self.login)
        return app

    async def home(self, _: web.Request) -> web.Response:
        html = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Passkeys</title><script src="/static/passkey.js" defer></script></head><body>
<button type="button" id="register" data-passkey="register"
  data-options-url="/register/options" data-verify-url="/register">Add a passkey</button>
<button type="button" id="login" data-passkey="login"
  data-options-url="/login/options" data-verify-url="/login">Sign in with a passkey</button>
<p id="status" data-passkey-status role="status" aria-live="polite"></p></body></html>"""
        # No inline script anywhere: the strictest script policy still runs the ceremonies.
        return web.Response(
            text=html,
            content_type="text/html",
            headers={"Content-Security-Policy": "default-src 'self'; script-src 'self'"},
        )

    async def welcome(self, _: web.Request) -> web.Response:
        return web.Response(text=f"<h1>Welcome, {self.logins[-1]}</h1>", content_type="text/html")

    async def script(self, _: web.Request) -> web.FileResponse:
        return web.FileResponse(PASSKEY_JS, headers={"Content-Type": "text/javascript"})

    def refuse(self, error: PasskeyError) -> web.Response:
        self.refusals.append(error.reason)
        return web.json_response(
            {
                "type": "about:blank",
                "title": "Passkey refused",
                "status": 400,
                "detail": str(error),
            },
            status=400,
            content_type="application/problem+json",
        )

    async def register_options(self, _: web.Request) -> web.Response:
        assert self.rp is not None
        options, self.challenges["register"] = registration_options(
            self.rp, user_id=ADA, user_name="ada", display_name="Ada", exclude=list(self.passkeys)
        )
        return web.Response(text=options, content_type="application/json")

    async def register(self, request: web.Request) -> web.Response:
        assert self.rp is not None
        answer = await request.json()
        try:
            # Single use: the challenge leaves the store before it is checked.
            challenge = self.challenges.pop("register", b"")
            stored = verify_registration(
                self.rp, credential_json=answer, challenge=challenge, now=time.time()
            )
        except PasskeyError as error:
            return self.refuse(error)
        self.passkeys[stored.credential_id] = stored
        return web.json_response({"message": "Passkey added."})

    async def login_options(self, _: web.Request) -> web.Response:
        assert self.rp is not None
        options, self.challenges["login"] = authentication_options(self.rp)
        return web.Response(text=options, content_type="application/json")

    async def login(self, request: web.Request) -> web.Response:
        assert self.rp is not None
        answer = await request.json()
        self.answers.append(answer)
        try:
            challenge = self.challenges.pop("login", b"")
            stored = self.passkeys.get(credential_id_of(answer))
            if stored is None or user_handle_of(answer) != ADA:
                return web.json_response({"detail": "Unknown passkey."}, status=400)
            self.passkeys[stored.credential_id] = verify_authentication(
                self.rp,
                credential_json=answer,
                challenge=challenge,
                stored=stored,
                now=time.time(),
                expected_user_handle=ADA,
            )
        except PasskeyError as error:
            return self.refuse(error)
        self.logins.append("ada")
        return web.json_response({"redirect": "/welcome"})


@pytest.fixture
async def site(live_server: Serve) -> tuple[PasskeySite, LiveServer]:
    passkey_site = PasskeySite()
    server = await live_server(passkey_site.app())
    passkey_site.rp = RelyingParty(id="localhost", name="CityPlane test", origins=(server.origin,))
    return passkey_site, server


async def status_after_click(page: Page, button: str) -> str:
    """Click a passkey button; the status line once the ceremony has said something."""
    await page.click(f"#{button}")
    await expect(page.locator("#status")).to_have_text(re.compile(r"\S"))
    return str(await page.text_content("#status"))


async def register_and_sign_in(
    page: Page, site: PasskeySite, server: LiveServer
) -> VirtualAuthenticator:
    authenticator = await virtual_authenticator(page)
    await page.goto(server.url("/"))
    assert await status_after_click(page, "register") == "Passkey added."
    await page.click("#login")
    await page.wait_for_url(server.url("/welcome"))
    return authenticator


async def test_passkey_registered_in_chromium_signs_in_without_a_username(
    page: Page, site: tuple[PasskeySite, LiveServer]
) -> None:
    passkeys, server = site
    authenticator = await virtual_authenticator(page)
    await page.goto(server.url("/"))

    assert await status_after_click(page, "register") == "Passkey added."
    [stored] = passkeys.passkeys.values()
    [held] = await authenticator.credentials()
    assert base64.b64decode(held["credentialId"]) == stored.credential_id
    assert held["rpId"] == "localhost" and held["isResidentCredential"]
    assert base64.b64decode(held["userHandle"]) == ADA
    assert stored.transports == ["internal"] and stored.last_used_at is None

    # Usernameless: the options name no credential; the authenticator picks Ada's passkey.
    await page.click("#login")
    await page.wait_for_url(server.url("/welcome"))
    assert await page.text_content("h1") == "Welcome, ada"
    assert passkeys.logins == ["ada"]
    after = passkeys.passkeys[stored.credential_id]
    assert after.last_used_at is not None
    assert after.sign_count > stored.sign_count
    [held] = await authenticator.credentials()
    assert held["signCount"] == after.sign_count


async def test_replayed_login_answer_is_refused(
    page: Page, site: tuple[PasskeySite, LiveServer]
) -> None:
    passkeys, server = site
    await register_and_sign_in(page, passkeys, server)
    captured = passkeys.answers[-1]

    # Its challenge was used up by the login it belonged to ...
    replay = await page.request.post(server.url("/login"), data=captured)
    assert replay.status == 400
    # ... and a fresh challenge does not make the old answer fit it.
    await page.request.post(server.url("/login/options"), data={})
    replay = await page.request.post(server.url("/login"), data=captured)
    assert replay.status == 400
    assert "expired or was already used" in (await replay.json())["detail"]
    assert passkeys.refusals == ["challenge", "challenge"]
    assert passkeys.logins == ["ada"]


async def test_login_relayed_through_another_origin_is_refused(
    page: Page, site: tuple[PasskeySite, LiveServer], live_server: Serve
) -> None:
    passkeys, server = site
    await register_and_sign_in(page, passkeys, server)

    # A look-alike site on another origin (same RP ID, "localhost", so the browser lets it use
    # the passkey) relays the real site's challenge and forwards the signed answer.
    async def relay(request: web.Request) -> web.Response:
        body = await request.read()
        answer = await page.request.post(server.url(request.path), data=body or b"{}")
        return web.Response(
            body=await answer.body(), status=answer.status, content_type="application/json"
        )

    look_alike = web.Application()
    look_alike.router.add_get("/", passkeys.home)
    look_alike.router.add_get("/static/passkey.js", passkeys.script)
    look_alike.router.add_post("/login/options", relay)
    look_alike.router.add_post("/login", relay)
    phishing = await live_server(look_alike)

    await page.goto(phishing.url("/"))
    assert (
        await status_after_click(page, "login") == "This passkey answer came from a different site."
    )
    assert passkeys.refusals == ["origin"]
    assert passkeys.logins == ["ada"]


async def test_authenticator_that_cannot_verify_the_user_gets_no_passkey(
    page: Page, site: tuple[PasskeySite, LiveServer]
) -> None:
    passkeys, server = site
    await virtual_authenticator(page, has_user_verification=False)
    await page.goto(server.url("/"))
    # The options require user verification, so Chromium itself refuses this authenticator.
    assert (
        await status_after_click(page, "register")
        == "The passkey request was cancelled or timed out."
    )
    assert passkeys.passkeys == {}


async def downgrade_user_verification(route: Route) -> None:
    """A tampered client: rewrite the server's options to ask for no user verification."""
    answer = await route.fetch()
    options = await answer.json()
    if "authenticatorSelection" in options:
        options["authenticatorSelection"]["userVerification"] = "discouraged"
    else:
        options["userVerification"] = "discouraged"
    await route.fulfill(response=answer, json=options)


async def test_passkey_made_without_user_verification_is_refused_by_the_server(
    page: Page, site: tuple[PasskeySite, LiveServer]
) -> None:
    passkeys, server = site
    await virtual_authenticator(page, has_user_verification=False)
    await page.route("**/register/options", downgrade_user_verification)
    await page.goto(server.url("/"))
    status = await status_after_click(page, "register")
    assert "did not verify you" in status
    assert passkeys.refusals == ["user_verification"]
    assert passkeys.passkeys == {}


async def test_login_without_user_verification_is_refused_by_the_server(
    page: Page, site: tuple[PasskeySite, LiveServer]
) -> None:
    passkeys, server = site
    authenticator = await register_and_sign_in(page, passkeys, server)
    await authenticator.set_user_verified(False)
    await page.route("**/login/options", downgrade_user_verification)
    await page.goto(server.url("/"))
    assert "did not verify you" in await status_after_click(page, "login")
    assert passkeys.refusals == ["user_verification"]
    assert passkeys.logins == ["ada"]


async def test_same_authenticator_is_not_registered_twice(
    page: Page, site: tuple[PasskeySite, LiveServer]
) -> None:
    passkeys, server = site
    authenticator = await virtual_authenticator(page)
    await page.goto(server.url("/"))
    assert await status_after_click(page, "register") == "Passkey added."
    # The second options list the first credential in excludeCredentials (§5.4).
    assert await status_after_click(page, "register") == (
        "This authenticator already holds a passkey for this account."
    )
    assert len(passkeys.passkeys) == 1 and len(await authenticator.credentials()) == 1


async def test_browser_side_messages_can_be_replaced_by_the_page(
    page: Page, site: tuple[PasskeySite, LiveServer]
) -> None:
    # How a Chinese page words the browser's own failures (server messages come from the server).
    _, server = site
    await virtual_authenticator(page, has_user_verification=False)
    await page.goto(server.url("/"))
    await page.locator("#status").evaluate(
        "(status) => status.setAttribute('data-msg-cancelled', '通行密钥请求已取消或超时。')"
    )
    assert await status_after_click(page, "register") == "通行密钥请求已取消或超时。"
