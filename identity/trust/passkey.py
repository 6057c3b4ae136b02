"""Passkeys: WebAuthn registration and authentication ceremonies for the identity hub.

The relying-party side of W3C Web Authentication Level 3 (https://www.w3.org/TR/webauthn-3/),
over Duo Labs' ``webauthn`` library, which does the CBOR, COSE and signature work. This module
adds the hub's policy on top: user verification is always required, discoverable credentials
are preferred (usernameless login), a sign-count regression refuses the login, and every
failure becomes one :class:`PasskeyError` whose message is safe to show.

**Challenges are single-use and the caller keeps them.** ``registration_options`` and
``authentication_options`` return ``(options_json, challenge)``: send the JSON to the browser,
store the challenge server-side (bound to the session, expiring after :data:`CEREMONY_TIMEOUT_MS`),
and *remove it before* calling ``verify_*`` with it, so that an answer can never be verified
twice (WebAuthn L3 §13.4.3, "Cryptographic Challenges"). This module holds no state.

Usernameless login, the order the caller follows:

1. ``credential_id_of(answer)`` and ``user_handle_of(answer)`` find the account and its
   :class:`StoredPasskey` (no cryptography yet, so nothing here is trusted);
2. ``verify_authentication(..., expected_user_handle=account_handle)`` checks that the
   credential belongs to that account (§7.2, the user handle step) and returns the passkey
   with its new sign count, which the caller saves.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import base64url_to_bytes
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import (
    AttestationConveyancePreference,
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

# WebAuthn L3 §15.1 recommends 300 000 to 600 000 ms when user verification is required.
# A stored challenge should expire after the same time.
CEREMONY_TIMEOUT_MS = 300_000


@dataclass(frozen=True)
class RelyingParty:
    """The hub as a WebAuthn relying party: its RP ID, display name and the origins it serves.

    ``id`` is a domain (``"localhost"`` in tests, ``"id.city.example"`` in production), never a
    URL; each origin is ``scheme://host[:port]`` whose host is ``id`` or a subdomain of it.
    """

    id: str
    name: str
    origins: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.id or "/" in self.id or ":" in self.id:
            raise ValueError(f"RP ID must be a bare domain, not {self.id!r}")
        if not self.origins:
            raise ValueError("a relying party needs at least one origin")
        for origin in self.origins:
            host = urlsplit(origin).hostname or ""
            # §5.1.3 / HTML "is a registrable domain suffix of or is equal to": a browser on an
            # origin outside the RP ID refuses the ceremony, so such a configuration never works.
            if host != self.id and not host.endswith("." + self.id):
                raise ValueError(f"origin {origin!r} is not on RP ID {self.id!r}")


@dataclass
class StoredPasskey:
    """A registered credential as the hub keeps it (public material only)."""

    credential_id: bytes
    public_key: bytes  # COSE_Key, as the authenticator sent it
    sign_count: int
    transports: list[str]
    aaguid: str
    backed_up: bool  # BS flag: the private key is synced (e.g. a password manager)
    device_type: str  # "single_device" | "multi_device" (BE flag, §6.1 authenticator data)
    created_at: float
    last_used_at: float | None

    def amr(self) -> tuple[str, ...]:
        """RFC 8176 ``amr`` values for a login with this passkey.

        A synced key lives in software on several devices (``swk``); a device-bound one is
        treated as hardware-held (``hwk``). User verification was required, so the login used
        the key plus a PIN or biometric: ``user`` and ``mfa`` (RFC 8176 §2).
        """
        return ("swk" if self.device_type == "multi_device" else "hwk", "user", "mfa")


class PasskeyError(Exception):
    """A passkey ceremony failed. ``str(error)`` is safe to show; ``reason`` is for logs/audit.

    Reasons: ``malformed``, ``challenge``, ``origin``, ``rp_id``, ``user_verification``,
    ``user_presence``, ``sign_count``, ``signature``, ``credential``, ``user_handle``,
    ``attestation``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    @property
    def message(self) -> str:
        return str(self.args[0])


_MESSAGES = {
    "malformed": "The passkey answer could not be read. Please try again.",
    "challenge": "This passkey request has expired or was already used. Please try again.",
    "origin": "This passkey answer came from a different site.",
    "rp_id": "This passkey belongs to a different site.",
    "user_verification": (
        "Your authenticator did not verify you (PIN or biometrics). "
        "Passkeys here need user verification."
    ),
    "user_presence": "The authenticator did not confirm that you were present.",
    "sign_count": (
        "This passkey reported an older use count than before, which is how a copied "
        "authenticator shows itself. It was refused; please contact support."
    ),
    "signature": "The passkey answer could not be verified.",
    "credential": "This passkey is not the one this login expected.",
    "user_handle": "This passkey belongs to a different account.",
    "attestation": "The authenticator's registration could not be verified.",
}


def _error(reason: str) -> PasskeyError:
    return PasskeyError(reason, _MESSAGES[reason])


# The library signals every failure with one exception class and an English message; these
# fragments (webauthn 3.0.1) sort them into reasons. The tests pin each reason, so a library
# upgrade that rewords a message shows up as a failing test, not as a wrong reason.
_REASON_BY_FRAGMENT = (
    ("malformed", "malformed"),  # "attestationObject was malformed" is not an attestation verdict
    ("challenge", "challenge"),
    ("origin", "origin"),
    ("RP ID hash", "rp_id"),
    ("User verification", "user_verification"),
    ("presen", "user_presence"),
    ("sign count", "sign_count"),
    ("signature", "signature"),
    ("Attestation", "attestation"),
    ("attestation", "attestation"),
)


def _reason_of(error: Exception) -> str:
    text = str(error)
    for fragment, reason in _REASON_BY_FRAGMENT:
        if fragment in text:
            return reason
    return "malformed"


def _as_mapping(credential_json: str | bytes | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(credential_json, str | bytes):
        try:
            value = json.loads(credential_json)
        except ValueError as error:
            raise _error("malformed") from error
    else:
        value = credential_json
    if not isinstance(value, Mapping):
        raise _error("malformed")
    return dict(value)


def registration_options(
    rp: RelyingParty,
    *,
    user_id: bytes,
    user_name: str,
    display_name: str,
    exclude: Sequence[bytes] = (),
) -> tuple[str, bytes]:
    """Options for ``navigator.credentials.create()`` and the challenge to keep server-side.

    ``user_id`` is the account's WebAuthn user handle: random, stable per account, at most 64
    bytes, never an e-mail or a name (§5.4.3). ``exclude`` lists the account's existing
    credential IDs so one authenticator is not registered twice (§5.4, excludeCredentials).
    """
    options = generate_registration_options(
        rp_id=rp.id,
        rp_name=rp.name,
        user_id=user_id,
        user_name=user_name,
        user_display_name=display_name,
        timeout=CEREMONY_TIMEOUT_MS,
        attestation=AttestationConveyancePreference.NONE,
        authenticator_selection=AuthenticatorSelectionCriteria(
            # Discoverable credentials make usernameless login possible; "preferred" still lets
            # security keys without resident-key storage register (§5.4.6).
            resident_key=ResidentKeyRequirement.PREFERRED,
            # A passkey alone is trust level 2 (ARCHITECTURE.md), so it must be multi-factor:
            # the key (possession) unlocked by a PIN or biometric (knowledge/inherence).
            # NIST SP 800-63B-4 §3.1.7 (multi-factor cryptographic authenticators) and its
            # Appendix B (syncable authenticators reach AAL2). Without UV it is one factor.
            user_verification=UserVerificationRequirement.REQUIRED,
        ),
        exclude_credentials=[PublicKeyCredentialDescriptor(id=c) for c in exclude],
    )
    return options_to_json(options), options.challenge


def verify_registration(
    rp: RelyingParty,
    *,
    credential_json: str | bytes | Mapping[str, Any],
    challenge: bytes,
    now: float,
) -> StoredPasskey:
    """Check a ``navigator.credentials.create()`` answer (§7.1) and return the passkey to store.

    ``challenge`` is the one this registration was started with, already removed from the
    caller's store. Raises :class:`PasskeyError`.
    """
    credential = _as_mapping(credential_json)
    try:
        verified = verify_registration_response(
            credential=credential,
            expected_challenge=challenge,
            expected_rp_id=rp.id,
            expected_origin=list(rp.origins),
            require_user_verification=True,
        )
    except (WebAuthnException, ValueError, TypeError, KeyError) as error:
        raise _error(_reason_of(error)) from error
    response = credential.get("response")
    raw_transports = response.get("transports") if isinstance(response, Mapping) else None
    known = {t.value for t in AuthenticatorTransport}
    transports = [t for t in raw_transports or [] if isinstance(t, str) and t in known]
    return StoredPasskey(
        credential_id=verified.credential_id,
        public_key=verified.credential_public_key,
        sign_count=verified.sign_count,
        transports=transports,
        aaguid=verified.aaguid,
        backed_up=verified.credential_backed_up,
        device_type=verified.credential_device_type.value,
        created_at=now,
        last_used_at=None,
    )


def authentication_options(rp: RelyingParty, *, allow: Sequence[bytes] = ()) -> tuple[str, bytes]:
    """Options for ``navigator.credentials.get()`` and the challenge to keep server-side.

    An empty ``allow`` asks for any discoverable credential of this RP: the browser lets the
    user pick an account, and the answer's ``userHandle`` says which (§5.5, allowCredentials).
    """
    options = generate_authentication_options(
        rp_id=rp.id,
        timeout=CEREMONY_TIMEOUT_MS,
        allow_credentials=[PublicKeyCredentialDescriptor(id=c) for c in allow],
        user_verification=UserVerificationRequirement.REQUIRED,
    )
    return options_to_json(options), options.challenge


def verify_authentication(
    rp: RelyingParty,
    *,
    credential_json: str | bytes | Mapping[str, Any],
    challenge: bytes,
    stored: StoredPasskey,
    now: float,
    expected_user_handle: bytes | None = None,
) -> StoredPasskey:
    """Check a ``navigator.credentials.get()`` answer (§7.2); return ``stored`` as updated.

    The result carries the new sign count, backup state and ``last_used_at``; save it. Raises
    :class:`PasskeyError` on a wrong challenge, origin or RP ID, missing user verification, a
    bad signature, or a sign count that did not go up (§6.1.1: a cloned authenticator).
    With ``expected_user_handle`` (the account found by ``user_handle_of``), an answer whose
    ``userHandle`` names another account is refused too (§7.2: the user handle step).
    """
    credential = _as_mapping(credential_json)
    if credential_id_of(credential) != stored.credential_id:
        raise _error("credential")
    if expected_user_handle is not None:
        handle = user_handle_of(credential)
        if handle is not None and handle != expected_user_handle:
            raise _error("user_handle")
    try:
        verified = verify_authentication_response(
            credential=credential,
            expected_challenge=challenge,
            expected_rp_id=rp.id,
            expected_origin=list(rp.origins),
            credential_public_key=stored.public_key,
            # §7.2, the signCount step: if either count is non-zero the new one must be greater;
            # both zero means the authenticator does not count (common for synced passkeys).
            credential_current_sign_count=stored.sign_count,
            require_user_verification=True,
        )
    except (WebAuthnException, ValueError, TypeError, KeyError) as error:
        raise _error(_reason_of(error)) from error
    return replace(
        stored,
        sign_count=verified.new_sign_count,
        backed_up=verified.credential_backed_up,
        device_type=verified.credential_device_type.value,
        last_used_at=now,
    )


def credential_id_of(credential_json: str | bytes | Mapping[str, Any]) -> bytes:
    """The credential ID an answer claims (``rawId``), to look up its :class:`StoredPasskey`.

    Unverified: only a lookup key until ``verify_authentication`` has passed.
    """
    return _base64url_field(_as_mapping(credential_json).get("rawId"))


def user_handle_of(credential_json: str | bytes | Mapping[str, Any]) -> bytes | None:
    """The user handle a login answer carries (the account's ``user_id``), or ``None``.

    Authenticators return it for discoverable credentials, so a usernameless login finds the
    account from it. Unverified, like ``credential_id_of``.
    """
    response = _as_mapping(credential_json).get("response")
    if not isinstance(response, Mapping):
        raise _error("malformed")
    handle = response.get("userHandle")
    if handle is None or handle == "":
        return None
    return _base64url_field(handle)


_BASE64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}")


def _base64url_field(value: object) -> bytes:
    # Python's decoder skips characters outside the alphabet; a lookup key must not be guessed
    # from garbage, so the alphabet is checked first (RFC 4648 §5).
    if not isinstance(value, str) or not _BASE64URL.fullmatch(value):
        raise _error("malformed")
    try:
        return base64url_to_bytes(value)
    except ValueError as error:
        raise _error("malformed") from error
