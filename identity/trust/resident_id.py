"""The 18-character citizen identification number of GB 11643-1999 (公民身份号码).

Layout (GB 11643-1999 §4): six digits of address (region) code (GB/T 2260), eight digits of
birth date YYYYMMDD, a three-digit sequence code (odd for men, even for women), and a check
character computed with ISO 7064:1983 MOD 11-2 (§8.2)::

    S = sum(a_i * W_i) for i = 1..17, W = 7 9 10 5 8 4 2 1 6 3 7 9 10 5 8 4 2
    check = "10X98765432"[S mod 11]

Only this check is offline; whether the number belongs to the person is the real-name
authority's question (:mod:`identity.trust.realname`). The hub never stores the number itself:
it stores :meth:`ResidentId.fingerprint`, a keyed hash, to enforce "one real-name identity
links to one person account", and shows :meth:`ResidentId.masked` to the person.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import unicodedata
from dataclasses import dataclass

WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
CHECK_CHARACTERS = "10X98765432"
MIN_BIRTH_YEAR = 1900


class InvalidResidentId(ValueError):
    """The text is not a valid resident ID; the message says why (safe to show the person)."""


def check_character(first17: str) -> str:
    """The GB 11643-1999 §8.2 check character for the first 17 digits."""
    total = sum(int(digit) * weight for digit, weight in zip(first17, WEIGHTS, strict=True))
    return CHECK_CHARACTERS[total % 11]


@dataclass(frozen=True)
class ResidentId:
    value: str  # 18 characters, a trailing check "X" upper-cased
    birth_date: datetime.date
    region_code: str

    def masked(self) -> str:
        """``110101********123X``: region code and the last four characters shown."""
        return self.value[:6] + "*" * 8 + self.value[-4:]

    def fingerprint(self, pepper: bytes) -> str:
        """HMAC-SHA256 of the number under the hub's secret pepper, hex.

        Keyed rather than a plain hash: there are few enough valid numbers (region x date x
        sequence) that an unkeyed hash could be reversed by enumeration.
        """
        return hmac.new(pepper, self.value.encode("ascii"), hashlib.sha256).hexdigest()

    def __repr__(self) -> str:
        # Keep full numbers out of logs and tracebacks.
        return f"ResidentId({self.masked()!r})"

    __str__ = masked


def parse_resident_id(text: str, *, today: datetime.date | None = None) -> ResidentId:
    """Check ``text`` and return the number it holds; raises :class:`InvalidResidentId`.

    Full-width digits and a lower-case ``x`` (common from Chinese input methods) are accepted.
    """
    value = unicodedata.normalize("NFKC", text).strip().upper()
    if len(value) != 18:
        raise InvalidResidentId(f"a resident ID has 18 characters, this has {len(value)}")
    first17, check = value[:17], value[17]
    if not (first17.isascii() and first17.isdigit()):
        raise InvalidResidentId("the first 17 characters of a resident ID must be digits")
    if check not in "0123456789X":
        raise InvalidResidentId("the last character of a resident ID must be a digit or X")
    region = first17[:6]
    if region[:2] == "00" or region == "000000":
        raise InvalidResidentId("the region code (first 6 digits) is not valid")
    try:
        birth = datetime.date(int(first17[6:10]), int(first17[10:12]), int(first17[12:14]))
    except ValueError:
        raise InvalidResidentId("the birth date (digits 7-14) is not a date") from None
    today = today or datetime.date.today()
    if birth.year < MIN_BIRTH_YEAR or birth > today:
        raise InvalidResidentId("the birth date (digits 7-14) is out of range")
    if check_character(first17) != check:
        raise InvalidResidentId("the check character does not match; please check for typos")
    return ResidentId(value=value, birth_date=birth, region_code=region)
