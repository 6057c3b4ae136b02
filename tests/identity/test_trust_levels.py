"""Trust levels: the ARCHITECTURE.md table, decay, step-up alternatives and configuration."""

from __future__ import annotations

import pytest

from identity.trust.levels import (
    EIDAS_HIGH,
    EIDAS_LOW,
    EIDAS_SUBSTANTIAL,
    AccountFacts,
    TrustConfigError,
    TrustLevelUnreachable,
    TrustPolicy,
    UnknownTrustLevel,
    Verification,
)

NOW = 1_800_000_000.0
MIN = 60.0
HOUR = 3600.0
PLAIN = AccountFacts()
REAL = AccountFacts(real_name_verified=True, real_name_at=NOW - 30 * 24 * HOUR)
POLICY = TrustPolicy.default()


def session(*methods: str, ago: float = 0.0) -> list[Verification]:
    return [Verification(m, NOW - ago) for m in methods]


def fed(level: int | None, ago: float = 0.0) -> Verification:
    return Verification("fed", NOW - ago, level=level)


@pytest.mark.parametrize(
    ("verifications", "facts", "expected"),
    [
        ([], PLAIN, 0),
        ([], REAL, 0),
        (session("otp"), PLAIN, 0),
        (session("sms"), REAL, 0),
        (session("face"), REAL, 0),
        (session("pwd"), PLAIN, 1),
        ([fed(None)], PLAIN, 1),
        ([fed(1)], REAL, 1),
        (session("pwd"), REAL, 1),
        (session("pwd", "otp"), PLAIN, 2),
        (session("pwd", "sms"), PLAIN, 2),
        (session("hwk"), PLAIN, 2),
        ([fed(2)], PLAIN, 2),
        (session("pwd", "otp"), REAL, 3),
        (session("hwk"), REAL, 3),
        ([fed(2)], REAL, 3),
        (session("pwd", "otp", "face"), PLAIN, 2),
        (session("pwd", "otp", "face"), REAL, 4),
        (session("hwk", "cert"), REAL, 4),
        (session("pwd", "face"), REAL, 1),
    ],
)
def test_level_follows_the_architecture_table(
    verifications: list[Verification], facts: AccountFacts, expected: int
) -> None:
    assert POLICY.level(verifications, facts, NOW) == expected


@pytest.mark.parametrize(
    ("verifications", "expected"),
    [
        (session("pwd", "otp", "face", ago=14 * MIN), 4),
        (session("pwd", "otp", "face", ago=16 * MIN), 3),
        (session("pwd", "otp", ago=59 * MIN), 3),
        (session("pwd", "otp", ago=61 * MIN), 2),
        (session("pwd", "otp", ago=7.9 * HOUR), 2),
        (session("pwd", "otp", ago=8.1 * HOUR), 1),
        (session("pwd", ago=11.9 * HOUR), 1),
        (session("pwd", ago=12.1 * HOUR), 0),
        ([fed(2, ago=2 * HOUR)], 2),
        ([fed(2, ago=9 * HOUR)], 1),
    ],
)
def test_levels_decay_with_the_age_of_the_verifications_behind_them(
    verifications: list[Verification], expected: int
) -> None:
    assert POLICY.level(verifications, REAL, NOW) == expected


def test_a_session_drops_from_four_to_three_when_the_face_match_ages() -> None:
    verifications = [
        *session("pwd", "otp", ago=10 * MIN),
        Verification("face", NOW - 5 * MIN),
    ]
    assert POLICY.level(verifications, REAL, NOW) == 4
    assert POLICY.level(verifications, REAL, NOW + 11 * MIN) == 3


@pytest.mark.parametrize(
    ("target", "verifications", "facts", "expected"),
    [
        (2, session("pwd"), PLAIN, [{"otp"}, {"sms"}, {"hwk"}]),
        (2, session("pwd", "otp"), PLAIN, []),
        (1, session("hwk"), PLAIN, [{"pwd"}, {"fed"}]),
        (3, session("pwd", "otp"), PLAIN, [{"realname"}]),
        (3, session("pwd"), PLAIN, [{"otp", "realname"}, {"sms", "realname"}, {"hwk", "realname"}]),
        (3, session("pwd"), REAL, [{"otp"}, {"sms"}, {"hwk"}]),
        (3, [fed(2)], PLAIN, [{"realname"}]),
        (4, session("pwd", "otp"), REAL, [{"face"}, {"cert"}]),
        (4, session("pwd", "otp"), PLAIN, [{"realname", "face"}, {"realname", "cert"}]),
        (4, session("pwd", "otp", "face"), REAL, []),
        (0, [], PLAIN, []),
    ],
)
def test_missing_for_names_only_the_fewest_new_methods(
    target: int, verifications: list[Verification], facts: AccountFacts, expected: list[set[str]]
) -> None:
    assert POLICY.missing_for(target, verifications, facts, NOW) == [
        frozenset(option) for option in expected
    ]


def test_missing_for_with_max_age_asks_again_for_methods_that_are_too_old() -> None:
    verifications = session("pwd", "otp", ago=10 * MIN)
    assert POLICY.missing_for(2, verifications, PLAIN, NOW) == []
    assert POLICY.missing_for(2, verifications, PLAIN, NOW, max_age=5 * MIN) == [frozenset({"hwk"})]
    fresher = [*verifications, Verification("pwd", NOW - MIN)]
    assert POLICY.missing_for(2, fresher, PLAIN, NOW, max_age=5 * MIN) == [
        frozenset({"otp"}),
        frozenset({"sms"}),
        frozenset({"hwk"}),
    ]


def test_missing_for_offers_only_the_methods_the_account_has() -> None:
    verifications = session("pwd", "otp", ago=30 * MIN)
    # Level 4 needs everything within 15 minutes: a passkey is the single fastest way, but a
    # person without one is offered password + code again.
    assert POLICY.missing_for(4, verifications, REAL, NOW) == [
        frozenset({"hwk", "face"}),
        frozenset({"hwk", "cert"}),
    ]
    assert POLICY.missing_for(4, verifications, REAL, NOW, available={"pwd", "otp", "face"}) == [
        frozenset({"pwd", "otp", "face"})
    ]


def test_missing_for_a_level_the_account_cannot_reach_is_an_error() -> None:
    with pytest.raises(TrustLevelUnreachable):
        POLICY.missing_for(2, session("pwd"), PLAIN, NOW, available={"pwd"})
    with pytest.raises(UnknownTrustLevel):
        POLICY.missing_for(5, session("pwd"), PLAIN, NOW)


@pytest.mark.parametrize(
    ("methods", "expected"),
    [
        (["pwd"], ["pwd"]),
        (["pwd", "pwd"], ["pwd"]),
        (["pwd", "otp"], ["mfa", "otp", "pwd"]),
        (["otp", "sms"], ["otp", "sms"]),
        (["hwk"], ["hwk"]),
        (["fed"], ["fed"]),
        (["pwd", "sms", "face"], ["face", "mfa", "pwd", "sms"]),
        (["cert"], ["sc"]),
    ],
)
def test_amr_uses_rfc_8176_values(methods: list[str], expected: list[str]) -> None:
    assert POLICY.amr(session(*methods)) == expected


def test_acr_names_and_reads_back_each_level() -> None:
    assert [POLICY.acr(n) for n in (1, 2, 3, 4)] == [
        "urn:cityplane:loa:1",
        "urn:cityplane:loa:2",
        "urn:cityplane:loa:3",
        "urn:cityplane:loa:4",
    ]
    assert POLICY.acr_values_supported() == [POLICY.acr(n) for n in (1, 2, 3, 4)]
    assert POLICY.level_of_acr("urn:cityplane:loa:3") == 3
    for other in ("urn:cityplane:loa:5", "urn:cityplane:loa:0", "loa:3", "urn:cityplane:loa:03"):
        assert POLICY.level_of_acr(other) is None
    with pytest.raises(UnknownTrustLevel):
        POLICY.acr(5)


def test_eidas_mapping_and_default_lifetimes() -> None:
    assert [POLICY.eidas(n) for n in (1, 2, 3, 4)] == [
        EIDAS_LOW,
        EIDAS_LOW,
        EIDAS_SUBSTANTIAL,
        EIDAS_HIGH,
    ]
    assert [POLICY.lifetime(n) for n in (1, 2, 3, 4)] == [12 * HOUR, 8 * HOUR, HOUR, 15 * MIN]


def test_configuration_changes_which_method_reaches_which_level() -> None:
    policy = TrustPolicy.from_config(
        {
            "levels": {
                "1": {"any": [["pwd"]]},
                "2": {"any": [["pwd", "otp"], ["hwk"], ["pwd", "face"]], "lifetime": "30m"},
                "3": {"requires": 2, "facts": ["realname"], "eidas": "high"},
            },
            "amr": {"cert": "swk"},
        }
    )
    assert policy.max_level == 3
    # SMS no longer counts as a second factor; federated logins are not accepted at all.
    assert policy.level(session("pwd", "sms"), PLAIN, NOW) == 1
    assert policy.level([fed(2)], PLAIN, NOW) == 0
    assert policy.level(session("pwd", "face"), REAL, NOW) == 3
    assert policy.level(session("pwd", "face", ago=31 * MIN), REAL, NOW) == 1
    assert policy.lifetime(1) is None
    assert policy.level(session("pwd", ago=1000 * HOUR), PLAIN, NOW) == 1
    assert policy.eidas(3) == EIDAS_HIGH
    assert policy.amr(session("cert")) == ["swk"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"levels": {}}, "non-empty"),
        ({"levels": {"1": {"any": [["pwd"]]}, "3": {"any": [["hwk"]]}}}, "without gaps"),
        ({"levels": {"1": {"any": [["password"]]}}}, "unknown methods ['password']"),
        ({"levels": {"1": {"any": ["pwd"]}}}, "'any' must be a list"),
        ({"levels": {"1": {"any": [[]]}}}, "'any' must be a list"),
        ({"levels": {"1": {"any": [["pwd"]], "requires": 1}}}, "lower level"),
        ({"levels": {"1": {"any": [["pwd"]]}, "2": {"requires": 3}}}, "lower level"),
        ({"levels": {"1": {"any": [["pwd"]], "lifetime": "soon"}}}, "level 1: lifetime"),
        ({"levels": {"1": {"any": [["pwd"]], "facts": ["rich"]}}}, "'facts'"),
        ({"levels": {"1": {"any": [["pwd"]], "eidas": "medium"}}}, "'eidas'"),
        ({"levels": {"1": {"any": [["pwd"]], "asserted": "yes"}}}, "'asserted'"),
        ({"levels": {"1": {"any": [["pwd"]], "colour": "red"}}}, "unknown keys ['colour']"),
        ({"levels": {"1": {}}}, "needs at least one"),
        ({"levels": {"one": {"any": [["pwd"]]}}}, "not a number"),
        ({"levels": {"1": {"any": [["pwd"]]}}, "amr": {"pin": "pin"}}, "unknown method 'pin'"),
        ({"level": {}}, "unknown trust configuration keys"),
    ],
)
def test_bad_configuration_is_refused_with_a_clear_message(
    config: dict[str, object], message: str
) -> None:
    with pytest.raises(TrustConfigError) as caught:
        TrustPolicy.from_config(config)
    assert message in str(caught.value)


def test_the_default_policy_is_the_documented_configuration() -> None:
    assert TrustPolicy.from_config({}).level(session("hwk"), REAL, NOW) == 3
