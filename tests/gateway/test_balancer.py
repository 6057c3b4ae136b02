"""Load balancing over one service's targets: round-robin, least-request, consistent-hash."""

from __future__ import annotations

import random
import time
from collections import Counter
from types import SimpleNamespace

import pytest
from multidict import CIMultiDict

from gateway.upstream import balancer as balancer_module
from gateway.upstream.balancer import (
    ConsistentHash,
    LeastRequest,
    RoundRobin,
    hash_key_extractor,
    make_balancer,
)
from gateway.upstream.target import TargetState

KINDS = ["round-robin", "least-request", "consistent-hash"]
NAMES = "abcdefgh"


def make_targets(*weights: int) -> list[TargetState]:
    return [
        TargetState("lb-test", f"http://10.0.0.{i + 1}:8080", weight)
        for i, weight in enumerate(weights)
    ]


def names(targets: list[TargetState], picks: list[TargetState | None]) -> str:
    return "".join(NAMES[targets.index(p)] if p is not None else "-" for p in picks)


def eject(target: TargetState) -> None:
    target.ejected_until = time.monotonic() + 60


def ip_keys(count: int) -> list[str]:
    return [f"198.51.{i // 250}.{i % 250}" for i in range(count)]


# --- targets ------------------------------------------------------------------------------------


def test_target_port_defaults_from_scheme() -> None:
    assert TargetState("s", "http://bus.internal", 1).port == 80
    https = TargetState("s", "https://bus.internal/api", 1)
    assert (https.scheme, https.host, https.port) == ("https", "bus.internal", 443)
    assert TargetState("s", "http://[::1]:9001", 1).host == "::1"
    assert TargetState("s", "http://[::1]:9001", 1).port == 9001


def test_target_rejects_a_url_without_http_scheme_or_host() -> None:
    with pytest.raises(ValueError):
        TargetState("s", "ftp://bus.internal", 1)
    with pytest.raises(ValueError):
        TargetState("s", "http://", 1)


def test_target_is_available_only_when_healthy_not_ejected_and_weighted() -> None:
    target = TargetState("s", "http://a", 1)
    now = time.monotonic()
    assert target.available(now)
    target.ejected_until = now + 5
    assert not target.available(now)
    assert target.available(now + 5)
    target.ejected_until = 0.0
    target.healthy = False
    assert not target.available(now)
    target.healthy = True
    target.weight = 0
    assert not target.available(now)


def test_target_load_reads_the_pools_in_flight_when_the_pool_keeps_one() -> None:
    target = TargetState("s", "http://a", 1)
    target.in_flight = 2
    assert target.load == 2
    target.pool = SimpleNamespace(in_flight=7)
    assert target.load == 7
    target.pool = object()  # a pool without a count: the target's own count is used
    assert target.load == 2


# --- round-robin --------------------------------------------------------------------------------


def test_smooth_round_robin_with_weights_5_1_1_spreads_the_heavy_target_like_nginx() -> None:
    targets = make_targets(5, 1, 1)
    rr = RoundRobin(targets)
    assert names(targets, [rr.pick() for _ in range(21)]) == "aabacaa" * 3


def test_round_robin_gives_each_target_exactly_its_weight_in_every_cycle() -> None:
    targets = make_targets(4, 3, 2, 1)
    rr = RoundRobin(targets)
    for _ in range(5):
        cycle = Counter(names(targets, [rr.pick() for _ in range(10)]))
        assert cycle == {"a": 4, "b": 3, "c": 2, "d": 1}


def test_round_robin_weights_with_a_common_divisor_balance_like_the_reduced_weights() -> None:
    targets = make_targets(10, 2, 2)
    rr = RoundRobin(targets)
    assert names(targets, [rr.pick() for _ in range(14)]) == "aabacaa" * 2


def test_round_robin_live_algorithm_matches_the_precomputed_cycle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(balancer_module, "_MAX_SCHEDULE_WORK", 0)  # as for very large weights
    targets = make_targets(5, 1, 1)
    rr = RoundRobin(targets)
    assert names(targets, [rr.pick() for _ in range(14)]) == "aabacaa" * 2


def test_round_robin_never_picks_a_weight_zero_target() -> None:
    targets = make_targets(1, 0, 2)
    rr = RoundRobin(targets)
    assert Counter(names(targets, [rr.pick() for _ in range(300)])) == {"a": 100, "c": 200}


def test_round_robin_skips_an_unavailable_target_and_keeps_the_others_proportional() -> None:
    targets = make_targets(5, 1, 1)
    targets[2].healthy = False
    rr = RoundRobin(targets)
    # 42 picks = 6 schedule cycles; c's 6 slots go to a and b by 5:1, so exactly 35:7.
    assert Counter(names(targets, [rr.pick() for _ in range(42)])) == {"a": 35, "b": 7}


def test_round_robin_takes_an_ejected_target_back_when_its_ejection_ends() -> None:
    targets = make_targets(1, 1)
    rr = RoundRobin(targets)
    eject(targets[0])
    assert names(targets, [rr.pick() for _ in range(4)]) == "bbbb"
    targets[0].ejected_until = time.monotonic() - 1  # expired, not yet reset to 0
    assert sorted(names(targets, [rr.pick() for _ in range(4)])) == ["a", "a", "b", "b"]


@pytest.mark.parametrize("kind", KINDS)
def test_pick_returns_none_when_every_target_is_down(kind: str) -> None:
    targets = make_targets(1, 2, 3, 1)
    balancer = make_balancer(kind, targets)
    targets[0].healthy = False
    targets[1].healthy = False
    eject(targets[2])
    targets[3].weight = 0
    assert [balancer.pick("k") for _ in range(10)] == [None] * 10
    assert balancer.pick(None) is None


@pytest.mark.parametrize("kind", KINDS)
def test_pick_returns_none_without_targets_or_weights(kind: str) -> None:
    assert make_balancer(kind, []).pick("k") is None
    assert make_balancer(kind, make_targets(0, 0, 0)).pick("k") is None


@pytest.mark.parametrize("kind", KINDS)
def test_pick_skips_an_unavailable_target(kind: str) -> None:
    targets = make_targets(1, 1, 1, 1)
    balancer = make_balancer(kind, targets)
    targets[1].healthy = False
    eject(targets[2])
    picks = Counter(names(targets, [balancer.pick(str(i)) for i in range(2000)]))
    assert set(picks) == {"a", "d"}


@pytest.mark.parametrize("kind", KINDS)
def test_a_retry_excluding_the_failed_target_goes_to_another_one(kind: str) -> None:
    targets = make_targets(1, 1, 1)
    balancer = make_balancer(kind, targets)
    for key in ip_keys(300):
        first = balancer.pick(key)
        second = balancer.pick(key, exclude=first)
        assert first is not None and second is not None
        assert second is not first


@pytest.mark.parametrize("kind", KINDS)
def test_a_retry_reuses_the_excluded_target_when_it_is_the_only_one_available(kind: str) -> None:
    targets = make_targets(3, 1)
    balancer = make_balancer(kind, targets)
    targets[1].healthy = False
    assert all(balancer.pick(k, exclude=targets[0]) is targets[0] for k in ip_keys(50))
    targets[0].healthy = False
    assert balancer.pick("k", exclude=targets[0]) is None


def test_make_balancer_rejects_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="random"):
        make_balancer("random", make_targets(1))


# --- least-request ------------------------------------------------------------------------------


def shares(targets: list[TargetState], picks: list[TargetState | None]) -> list[float]:
    counts = Counter(names(targets, picks))
    return [counts[NAMES[i]] / len(picks) for i in range(len(targets))]


def test_least_request_prefers_the_less_loaded_target() -> None:
    targets = make_targets(1, 1, 1, 1)
    for target, in_flight in zip(targets, [0, 5, 5, 5], strict=True):
        target.in_flight = in_flight
    lr = LeastRequest(targets, rand=random.Random(7).random)
    idle, *busy = shares(targets, [lr.pick() for _ in range(10_000)])
    # Two draws: the idle target wins whenever it is drawn, 1 - (3/4)^2 = 7/16 of the picks.
    assert idle == pytest.approx(7 / 16, abs=0.03)
    assert all(share == pytest.approx(3 / 16, abs=0.03) for share in busy)


def test_least_request_picks_fewer_the_more_requests_a_target_has_in_flight() -> None:
    targets = make_targets(1, 1, 1, 1)
    for target, in_flight in zip(targets, [0, 1, 2, 3], strict=True):
        target.in_flight = in_flight
    lr = LeastRequest(targets, rand=random.Random(11).random)
    a, b, c, d = shares(targets, [lr.pick() for _ in range(10_000)])
    # Exactly 7/16, 5/16, 3/16 and 1/16 in expectation.
    assert a > b > c > d
    assert d == pytest.approx(1 / 16, abs=0.02)


def test_least_request_splits_by_weight_when_idle() -> None:
    targets = make_targets(3, 1, 1, 1)
    lr = LeastRequest(targets, rand=random.Random(3).random)
    heavy, *light = shares(targets, [lr.pick() for _ in range(10_000)])
    assert heavy == pytest.approx(0.5, abs=0.03)
    assert all(share == pytest.approx(1 / 6, abs=0.03) for share in light)


def test_least_request_compares_load_per_unit_of_weight() -> None:
    targets = make_targets(2, 1, 1, 1)
    for target, in_flight in zip(targets, [2, 1, 1, 1], strict=True):
        target.in_flight = in_flight  # the same load per weight everywhere: shares follow weight
    lr = LeastRequest(targets, rand=random.Random(5).random)
    heavy, *light = shares(targets, [lr.pick() for _ in range(10_000)])
    assert heavy == pytest.approx(0.4, abs=0.03)
    assert all(share == pytest.approx(0.2, abs=0.03) for share in light)


def test_least_request_reads_the_pools_in_flight() -> None:
    targets = make_targets(1, 1, 1)
    targets[0].pool = SimpleNamespace(in_flight=50)
    lr = LeastRequest(targets, rand=random.Random(1).random)
    busy, *_ = shares(targets, [lr.pick() for _ in range(3000)])
    assert busy == pytest.approx(1 / 9, abs=0.03)  # only when drawn twice


def test_least_request_with_two_equal_targets_alternates_when_idle() -> None:
    targets = make_targets(1, 1)
    lr = LeastRequest(targets)
    assert names(targets, [lr.pick() for _ in range(6)]) in ("ababab", "bababa")


def test_least_request_with_two_equal_targets_always_takes_the_less_loaded() -> None:
    targets = make_targets(1, 1)
    targets[0].in_flight = 3
    lr = LeastRequest(targets)
    assert names(targets, [lr.pick() for _ in range(6)]) == "bbbbbb"


def test_least_request_finds_the_one_available_target_among_many_down() -> None:
    targets = make_targets(*[1] * 20)
    for target in targets[1:]:
        target.healthy = False
    lr = LeastRequest(targets)
    assert all(lr.pick() is targets[0] for _ in range(100))


# --- consistent-hash ----------------------------------------------------------------------------


def test_consistent_hash_sends_the_same_key_to_the_same_target() -> None:
    ring = ConsistentHash(make_targets(1, 1, 1, 1))
    for key in ip_keys(500):
        assert len({ring.pick(key) for _ in range(5)}) == 1


def test_consistent_hash_maps_keys_the_same_whatever_the_target_order() -> None:
    targets = make_targets(1, 2, 1, 3)
    forward = ConsistentHash(targets)
    backward = ConsistentHash(list(reversed(targets)))
    assert all(forward.pick(k) is backward.pick(k) for k in ip_keys(2000))


def test_consistent_hash_spreads_keys_evenly_over_equal_targets() -> None:
    targets = make_targets(1, 1, 1, 1)
    ring = ConsistentHash(targets)
    counts = Counter(names(targets, [ring.pick(k) for k in ip_keys(10_000)]))
    assert all(abs(counts[n] - 2500) <= 0.15 * 2500 for n in "abcd"), counts


def test_consistent_hash_gives_a_heavier_target_more_keys() -> None:
    targets = make_targets(2, 1, 1)
    ring = ConsistentHash(targets)
    heavy, *light = shares(targets, [ring.pick(k) for k in ip_keys(10_000)])
    assert heavy == pytest.approx(0.5, rel=0.15)
    assert all(share == pytest.approx(0.25, rel=0.15) for share in light)


def test_ejecting_one_of_four_targets_remaps_only_its_keys_and_they_come_back() -> None:
    targets = make_targets(1, 1, 1, 1)
    ring = ConsistentHash(targets)
    keys = ip_keys(10_000)
    before = {k: ring.pick(k) for k in keys}
    eject(targets[2])
    during = {k: ring.pick(k) for k in keys}
    moved = [k for k in keys if during[k] is not before[k]]
    assert {before[k] for k in moved} == {targets[2]}
    assert len(moved) == sum(1 for k in keys if before[k] is targets[2])
    # Its keys spread over all three others rather than piling onto one neighbour.
    assert {during[k] for k in moved} == {targets[0], targets[1], targets[3]}
    targets[2].ejected_until = 0.0
    assert all(ring.pick(k) is before[k] for k in keys)


def test_removing_one_of_four_targets_from_config_remaps_only_its_keys() -> None:
    targets = make_targets(1, 1, 1, 1)
    keys = ip_keys(10_000)
    full = ConsistentHash(targets)
    before = {k: full.pick(k) for k in keys}
    remaining = ConsistentHash([targets[0], targets[1], targets[3]])
    moved = [k for k in keys if remaining.pick(k) is not before[k]]
    assert {before[k] for k in moved} == {targets[2]}
    assert len(moved) / len(keys) == pytest.approx(0.25, rel=0.15)


def test_consistent_hash_retry_goes_to_the_same_next_target_for_a_key() -> None:
    targets = make_targets(1, 1, 1, 1)
    ring = ConsistentHash(targets)
    for key in ip_keys(200):
        first = ring.pick(key)
        retries = {ring.pick(key, exclude=first) for _ in range(3)}
        assert len(retries) == 1 and first not in retries


def test_consistent_hash_without_a_key_spreads_by_weight() -> None:
    targets = make_targets(2, 1, 1)
    ring = ConsistentHash(targets, rand=random.Random(2).random)
    heavy, *light = shares(targets, [ring.pick(None) for _ in range(10_000)])
    assert heavy == pytest.approx(0.5, rel=0.15)
    assert all(share == pytest.approx(0.25, rel=0.15) for share in light)


# --- hash keys ----------------------------------------------------------------------------------


def test_hash_on_ip_uses_the_client_ip() -> None:
    extract = hash_key_extractor("ip")
    assert extract(CIMultiDict({"X-User": "u1"}), "203.0.113.9") == "203.0.113.9"


def test_hash_on_header_uses_its_value_case_insensitively() -> None:
    extract = hash_key_extractor("header:X-Tenant")
    assert extract(CIMultiDict({"x-tenant": "harbour"}), "203.0.113.9") == "harbour"


def test_hash_on_header_falls_back_to_the_client_ip_when_missing_or_empty() -> None:
    extract = hash_key_extractor("header:X-Tenant")
    assert extract(CIMultiDict(), "203.0.113.9") == "203.0.113.9"
    assert extract(CIMultiDict({"X-Tenant": ""}), "203.0.113.9") == "203.0.113.9"


def test_hash_on_cookie_uses_that_cookies_value() -> None:
    extract = hash_key_extractor("cookie:session")
    headers = CIMultiDict({"Cookie": "xsession=no; theme=dark;session=abc123 ; lang=en"})
    assert extract(headers, "203.0.113.9") == "abc123"
    assert extract(CIMultiDict({"cookie": 'session="q1"'}), "203.0.113.9") == "q1"


def test_hash_on_cookie_falls_back_to_the_client_ip_when_the_cookie_is_absent() -> None:
    extract = hash_key_extractor("cookie:session")
    assert extract(CIMultiDict(), "203.0.113.9") == "203.0.113.9"
    assert extract(CIMultiDict({"Cookie": "xsession=1; Session=2"}), "ip") == "ip"
    assert extract(CIMultiDict({"Cookie": "session="}), "ip") == "ip"


@pytest.mark.parametrize("hash_on", ["", "header:", "cookie", "query:q", "consumer"])
def test_hash_key_extractor_rejects_an_unknown_hash_on(hash_on: str) -> None:
    with pytest.raises(ValueError):
        hash_key_extractor(hash_on)
