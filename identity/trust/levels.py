"""Trust levels: which verifications, in this session and on the account, reach which level.

The defaults follow the table in ARCHITECTURE.md; the mapping is configuration
(docs/trust-levels.md describes the format)::

    level 1  any one of {pwd}, {fed}                                     lifetime 12 h
    level 2  {pwd, otp} | {pwd, sms} | {hwk} | a federated login asserting >= 2   8 h
    level 3  level 2 and the account is real-name verified                          1 h
    level 4  level 3 and ({face} in this session | {cert})                        15 min

*Decay*: a level N counts only the verifications made within ``lifetime(N)`` — every
verification that supports it, including those reached through ``requires`` — so a session
drops from 4 to 3 fifteen minutes after its face match, and from 3 to 2 an hour after its
second factor. OIDC Core §3.1.2.1 ``max_age`` and RFC 9470 §3 ``max_age`` narrow this further
(``missing_for(..., max_age=...)``).

Method names are RFC 8176 ``amr`` values where one exists (``pwd``, ``otp``, ``sms``, ``hwk``,
``face``); ``fed`` (a federated login) and ``cert`` (a government certificate) are ours and map to
``amr`` values in :meth:`TrustPolicy.amr`. Account *facts* (``realname``) are verified once per
account, not per session, and do not decay here.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cityplane.schema import parse_duration

METHODS = frozenset({"pwd", "otp", "sms", "hwk", "fed", "face", "cert"})
FACTS = frozenset({"realname"})

ACR_PREFIX = "urn:cityplane:loa:"
_ACR = re.compile(r"^urn:cityplane:loa:([1-9][0-9]?)$")

EIDAS_LOW = "http://eidas.europa.eu/LoA/low"
EIDAS_SUBSTANTIAL = "http://eidas.europa.eu/LoA/substantial"
EIDAS_HIGH = "http://eidas.europa.eu/LoA/high"
_EIDAS = {"low": EIDAS_LOW, "substantial": EIDAS_SUBSTANTIAL, "high": EIDAS_HIGH}

# RFC 8176 §2 registered values; "fed" is not registered but is what Microsoft Entra ID and
# others emit for a federated assertion, so relying parties already understand it. A
# government certificate is most often held on a smart card ("sc", RFC 8176 §2).
DEFAULT_AMR = {
    "pwd": "pwd",
    "otp": "otp",
    "sms": "sms",
    "hwk": "hwk",
    "face": "face",
    "fed": "fed",
    "cert": "sc",
}
# Factor categories (NIST SP 800-63B §5.1): two categories in one session add RFC 8176 "mfa".
_CATEGORY = {
    "pwd": "know",
    "otp": "have",
    "sms": "have",
    "hwk": "have",
    "cert": "have",
    "face": "are",
}


class TrustConfigError(ValueError):
    """The trust-level configuration is not usable; the message says where and why."""


class UnknownTrustLevel(ValueError):
    """A level outside the configured 1..N was asked for."""


class TrustLevelUnreachable(ValueError):
    """No way to the asked level is open to this account with the methods it has."""


@dataclass(frozen=True)
class Verification:
    """One method verified in this session at ``at`` (epoch seconds).

    ``level`` is set only for a federated login: the level its IdP asserted after the
    configured ``acr`` mapping.
    """

    method: str
    at: float
    level: int | None = None


@dataclass(frozen=True)
class AccountFacts:
    """What is known about the account itself, independent of the session."""

    real_name_verified: bool = False
    real_name_at: float | None = None

    def has(self, fact: str) -> bool:
        if fact == "realname":
            return self.real_name_verified
        return False


@dataclass(frozen=True)
class LevelRule:
    """How one level is reached (compiled from configuration)."""

    level: int
    any_of: tuple[frozenset[str], ...]  # alternatives; empty = no methods of its own
    asserted: bool  # a federated login asserting >= level satisfies ``any_of``
    requires: int | None
    facts: frozenset[str]
    lifetime: float | None
    eidas: str


_DEFAULT_CONFIG: dict[str, Any] = {
    "levels": {
        "1": {"any": [["pwd"], ["fed"]], "asserted": True, "lifetime": "12h", "eidas": "low"},
        "2": {
            "any": [["pwd", "otp"], ["pwd", "sms"], ["hwk"]],
            "asserted": True,
            "lifetime": "8h",
            "eidas": "low",
        },
        "3": {"requires": 2, "facts": ["realname"], "lifetime": "1h", "eidas": "substantial"},
        "4": {"requires": 3, "any": [["face"], ["cert"]], "lifetime": "15m", "eidas": "high"},
    }
}

_LEVEL_KEYS = {"any", "asserted", "requires", "facts", "lifetime", "eidas"}


class TrustPolicy:
    """Levels 1..N compiled once from configuration; every question is answered from it."""

    def __init__(self, rules: Sequence[LevelRule], amr_names: Mapping[str, str]) -> None:
        self._rules = {rule.level: rule for rule in rules}
        self._amr = dict(amr_names)
        self.max_level = max(self._rules)

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def default(cls) -> TrustPolicy:
        return cls.from_config(_DEFAULT_CONFIG)

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> TrustPolicy:
        if not isinstance(data, Mapping):
            raise TrustConfigError("trust configuration must be a mapping")
        unknown = set(data) - {"levels", "amr"}
        if unknown:
            raise TrustConfigError(f"unknown trust configuration keys: {sorted(unknown)}")
        levels = data.get("levels", _DEFAULT_CONFIG["levels"])
        if not isinstance(levels, Mapping) or not levels:
            raise TrustConfigError("'levels' must be a non-empty mapping of level -> rule")
        rules = [_parse_rule(key, value) for key, value in levels.items()]
        numbers = sorted(rule.level for rule in rules)
        if numbers != list(range(1, len(numbers) + 1)):
            raise TrustConfigError(f"levels must be 1..N without gaps, got {numbers}")
        for rule in rules:
            if rule.requires is not None and rule.requires not in numbers:
                raise TrustConfigError(
                    f"level {rule.level}: requires unknown level {rule.requires}"
                )
        amr = dict(DEFAULT_AMR)
        overrides = data.get("amr", {})
        if not isinstance(overrides, Mapping):
            raise TrustConfigError("'amr' must be a mapping of method -> RFC 8176 value")
        for method, value in overrides.items():
            if method not in METHODS:
                raise TrustConfigError(f"amr: unknown method {method!r}")
            if not isinstance(value, str) or not value:
                raise TrustConfigError(f"amr: value for {method!r} must be a non-empty string")
            amr[method] = value
        return cls(rules, amr)

    # -- questions --------------------------------------------------------------------------

    def level(self, verifications: Sequence[Verification], facts: AccountFacts, now: float) -> int:
        """The highest level the session reaches now; 0 when nothing counts."""
        for level in range(self.max_level, 0, -1):
            if self._satisfied(level, verifications, facts, now, not_before=None):
                return level
        return 0

    def missing_for(
        self,
        target: int,
        verifications: Sequence[Verification],
        facts: AccountFacts,
        now: float,
        max_age: float | None = None,
        *,
        available: Iterable[str] | None = None,
    ) -> list[frozenset[str]]:
        """The alternatives reaching ``target`` with the fewest *new* methods; [] if satisfied.

        ``available``, when given, is what this account can do (its enrolled methods); the
        alternatives are then limited to those, so a person without a passkey is not offered
        only ``hwk``; :class:`TrustLevelUnreachable` when none of the ways is open to it (the
        OIDC error ``unmet_authentication_requirements`` of OpenID Connect Core §3.1.2.6).

        ``realname`` appears as a pseudo-method when the account is not real-name verified.
        Only methods the hub verifies itself are offered: a federated login asserting a high
        enough level also satisfies levels with ``asserted``, but whether the upstream IdP will
        assert it is not the hub's to promise.
        """
        if target <= 0:
            return []
        if target not in self._rules:
            raise UnknownTrustLevel(f"no trust level {target} (levels are 1..{self.max_level})")
        not_before = now - max_age if max_age is not None else None
        needed = self._missing(target, verifications, facts, now, not_before)
        if frozenset() in needed:
            return []
        if available is not None:
            usable = set(available) | FACTS
            needed = [option for option in needed if option <= usable]
            if not needed:
                raise TrustLevelUnreachable(
                    f"level {target} cannot be reached with {sorted(set(available))}"
                )
        fewest = min(len(option) for option in needed)
        return [option for option in needed if len(option) == fewest]

    def amr(self, verifications: Iterable[Verification]) -> list[str]:
        """RFC 8176 values of the verified methods, sorted and deduplicated.

        Adds ``mfa`` (RFC 8176 §2) when methods of two factor categories were verified.
        """
        methods = {v.method for v in verifications}
        values = {self._amr.get(m, m) for m in methods}
        if len({_CATEGORY[m] for m in methods if m in _CATEGORY}) >= 2:
            values.add("mfa")
        return sorted(values)

    def acr(self, level: int) -> str:
        if level not in self._rules:
            raise UnknownTrustLevel(f"no trust level {level} (levels are 1..{self.max_level})")
        return f"{ACR_PREFIX}{level}"

    def level_of_acr(self, acr: str) -> int | None:
        """The level an ``acr`` value of ours names, or None for anything else."""
        match = _ACR.match(acr)
        if match is None or int(match.group(1)) not in self._rules:
            return None
        return int(match.group(1))

    def acr_values_supported(self) -> list[str]:
        """For the discovery document (OpenID Connect Discovery 1.0 §3)."""
        return [self.acr(level) for level in sorted(self._rules)]

    def eidas(self, level: int) -> str:
        """The eIDAS level of assurance URI a level maps to (docs/trust-levels.md says why)."""
        if level not in self._rules:
            raise UnknownTrustLevel(f"no trust level {level} (levels are 1..{self.max_level})")
        return self._rules[level].eidas

    def lifetime(self, level: int) -> float | None:
        rule = self._rules.get(level)
        return rule.lifetime if rule is not None else None

    # -- evaluation -------------------------------------------------------------------------

    def _cutoff(self, level: int, now: float) -> float | None:
        lifetime = self._rules[level].lifetime
        return now - lifetime if lifetime is not None else None

    def _satisfied(
        self,
        level: int,
        verifications: Sequence[Verification],
        facts: AccountFacts,
        now: float,
        not_before: float | None,
    ) -> bool:
        rule = self._rules[level]
        # The strictest lifetime on the way down applies to everything that supports a level.
        cutoff = _later(not_before, self._cutoff(level, now))
        if not all(facts.has(fact) for fact in rule.facts):
            return False
        if rule.requires is not None and not self._satisfied(
            rule.requires, verifications, facts, now, cutoff
        ):
            return False
        return _own_methods_done(rule, [v for v in verifications if _fresh(v, cutoff)])

    def _missing(
        self,
        level: int,
        verifications: Sequence[Verification],
        facts: AccountFacts,
        now: float,
        not_before: float | None,
    ) -> list[frozenset[str]]:
        """Every way to complete ``level`` from here, as sets of new methods (and facts)."""
        rule = self._rules[level]
        cutoff = _later(not_before, self._cutoff(level, now))
        lacking = frozenset(fact for fact in rule.facts if not facts.has(fact))
        below = (
            self._missing(rule.requires, verifications, facts, now, cutoff)
            if rule.requires is not None
            else [frozenset()]
        )
        fresh = [v for v in verifications if _fresh(v, cutoff)]
        methods = {v.method for v in fresh}
        if _own_methods_done(rule, fresh):
            own: list[frozenset[str]] = [frozenset()]
        else:
            own = [option - methods for option in rule.any_of]
        result: list[frozenset[str]] = []
        for left, right in itertools.product(below, own):
            option = left | right | lacking
            if option not in result:
                result.append(option)
        return result


def _own_methods_done(rule: LevelRule, fresh: Sequence[Verification]) -> bool:
    """The level's own ``any`` part is met by these (already fresh) verifications."""
    if not rule.any_of:
        return True
    methods = {v.method for v in fresh}
    if any(option <= methods for option in rule.any_of):
        return True
    return rule.asserted and any(v.level is not None and v.level >= rule.level for v in fresh)


def _fresh(verification: Verification, cutoff: float | None) -> bool:
    return cutoff is None or verification.at >= cutoff


def _later(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def _parse_rule(key: Any, value: Any) -> LevelRule:
    try:
        level = int(key)
    except (TypeError, ValueError):
        raise TrustConfigError(f"level {key!r} is not a number") from None
    where = f"level {level}"
    if not 1 <= level <= 99:
        raise TrustConfigError(f"{where}: levels are numbered 1..99")
    if not isinstance(value, Mapping):
        raise TrustConfigError(f"{where}: must be a mapping")
    unknown = set(value) - _LEVEL_KEYS
    if unknown:
        raise TrustConfigError(f"{where}: unknown keys {sorted(unknown)}")

    any_raw = value.get("any", [])
    if not isinstance(any_raw, list) or not all(isinstance(o, list) and o for o in any_raw):
        raise TrustConfigError(f"{where}: 'any' must be a list of non-empty lists of methods")
    any_of: list[frozenset[str]] = []
    for option in any_raw:
        bad = [m for m in option if m not in METHODS]
        if bad:
            raise TrustConfigError(
                f"{where}: unknown methods {bad} (known: {', '.join(sorted(METHODS))})"
            )
        any_of.append(frozenset(option))

    requires = value.get("requires")
    if requires is not None:
        if isinstance(requires, bool) or not isinstance(requires, int) or requires < 1:
            raise TrustConfigError(f"{where}: 'requires' must be a lower level number")
        if requires >= level:
            raise TrustConfigError(f"{where}: 'requires' must name a lower level, not {requires}")

    facts_raw = value.get("facts", [])
    if not isinstance(facts_raw, list) or any(f not in FACTS for f in facts_raw):
        raise TrustConfigError(f"{where}: 'facts' must be a list of {sorted(FACTS)}")

    asserted = value.get("asserted", False)
    if not isinstance(asserted, bool):
        raise TrustConfigError(f"{where}: 'asserted' must be true or false")
    if not any_of and requires is None and not facts_raw and not asserted:
        raise TrustConfigError(f"{where}: needs at least one of any, requires, facts, asserted")

    lifetime_raw = value.get("lifetime")
    lifetime: float | None = None
    if lifetime_raw is not None:
        try:
            lifetime = parse_duration(lifetime_raw)
        except ValueError as exc:
            raise TrustConfigError(f"{where}: lifetime: {exc}") from None

    eidas_raw = value.get("eidas", "low")
    if eidas_raw not in _EIDAS:
        raise TrustConfigError(f"{where}: 'eidas' must be one of {sorted(_EIDAS)}")

    return LevelRule(
        level=level,
        any_of=tuple(any_of),
        asserted=asserted,
        requires=requires,
        facts=frozenset(facts_raw),
        lifetime=lifetime,
        eidas=_EIDAS[eidas_raw],
    )
