"""Time-based one-time passwords (TOTP, RFC 6238) via pyotp, and the enrollment QR code.

Codes are 6 digits over 30-second steps with HMAC-SHA1 (RFC 6238 §4, the defaults every
authenticator app understands). Verification accepts one step either side for clock drift
(RFC 6238 §5.2 recommends at most one) and refuses a step at or before the last one accepted
for the account, so an observed code cannot be replayed (RFC 6238 §5.2: "the verifier MUST NOT
accept the second attempt of the OTP after the successful validation has been issued").
"""

from __future__ import annotations

import hmac

import pyotp
import segno

STEP_SECONDS = 30
DIGITS = 6
DRIFT_STEPS = 1


def new_totp_secret() -> str:
    """A fresh 160-bit base32 secret (RFC 4226 §4 R6 recommends 160 bits)."""
    return pyotp.random_base32(32)


def provisioning_uri(secret: str, account_name: str, issuer: str) -> str:
    """The ``otpauth://totp/...`` URI authenticator apps scan (Google Authenticator key format)."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS).provisioning_uri(
        name=account_name, issuer_name=issuer
    )


def qr_svg(uri: str) -> str:
    """The URI as an inline SVG QR code for the enrollment page (no external image request)."""
    return segno.make(uri, error="m").svg_inline(scale=4, title="QR code")


def verify_totp(secret: str, code: str, *, now: float, last_step: int | None) -> int | None:
    """The time step ``code`` belongs to, or None when it is wrong, out of window or replayed.

    Store the returned step as the account's ``last_step``.
    """
    code = code.replace(" ", "").strip()
    if len(code) != DIGITS or not code.isascii() or not code.isdigit():
        return None
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS)
    current = int(now // STEP_SECONDS)
    accepted = None
    for step in range(current - DRIFT_STEPS, current + DRIFT_STEPS + 1):
        # Compare against every step in the window so the time taken does not say which matched.
        if hmac.compare_digest(totp.generate_otp(step), code) and accepted is None:
            accepted = step
    if accepted is None or (last_step is not None and accepted <= last_step):
        return None
    return accepted
