"""The audit log's hash chain finds altered, deleted, inserted and reordered entries."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from identity.audit_chain import GENESIS, canonical, chain_hash, verify_chain


def build(entries: list[dict[str, Any]], start: str = GENESIS) -> list[tuple[dict[str, Any], str]]:
    rows, previous = [], start
    for entry in entries:
        previous = chain_hash(previous, entry)
        rows.append((entry, previous))
    return rows


ENTRIES = [
    {"at": 1_800_000_000 + i, "event": event, "actor": actor, "detail": {"client": "bus-app"}}
    for i, (event, actor) in enumerate(
        [
            ("login", "person-1"),
            ("step_up", "person-1"),
            ("consent", "person-1"),
            ("token_issued", "bus-app"),
            ("admin_change", "admin"),
        ]
    )
]


def test_canonical_form_is_sorted_compact_utf8() -> None:
    assert canonical({"b": 1, "a": ["x", None, True], "名": "张三"}) == (
        '{"a":["x",null,true],"b":1,"名":"张三"}'.encode()
    )
    assert canonical({"a": 1, "b": 2}) == canonical({"b": 2, "a": 1})


def test_chain_hash_is_sha256_of_the_previous_hash_and_the_entry() -> None:
    import hashlib

    entry = {"event": "login"}
    assert (
        chain_hash(GENESIS, entry) == hashlib.sha256(b"0" * 64 + b'{"event":"login"}').hexdigest()
    )


def test_an_untouched_log_verifies() -> None:
    assert verify_chain(build(ENTRIES)) is None
    assert verify_chain([]) is None


@pytest.mark.parametrize("index", range(len(ENTRIES)))
@pytest.mark.parametrize(
    "tamper",
    [
        lambda e: e.update(actor="someone-else"),
        lambda e: e.update(at=e["at"] + 1),
        lambda e: e["detail"].update(client="evil-app"),
        lambda e: e.pop("detail"),
        lambda e: e.update(extra=True),
    ],
    ids=["actor", "time", "nested", "removed-field", "added-field"],
)
def test_changing_any_field_of_any_entry_is_found_at_that_entry(index: int, tamper: Any) -> None:
    rows = build(copy.deepcopy(ENTRIES))
    tamper(rows[index][0])
    assert verify_chain(rows) == index


@pytest.mark.parametrize("index", range(len(ENTRIES) - 1))
def test_deleting_an_entry_is_found_at_the_next_one(index: int) -> None:
    rows = build(ENTRIES)
    del rows[index]
    assert verify_chain(rows) == index


def test_reordering_entries_is_found() -> None:
    rows = build(ENTRIES)
    rows[1], rows[2] = rows[2], rows[1]
    assert verify_chain(rows) == 1


def test_inserting_an_entry_is_found() -> None:
    rows = build(ENTRIES)
    forged = {"event": "consent", "actor": "person-9"}
    rows.insert(2, (forged, chain_hash(rows[1][1], forged)))
    assert verify_chain(rows) == 3


def test_rewriting_a_stored_hash_is_found() -> None:
    rows = build(ENTRIES)
    rows[3] = (rows[3][0], "f" * 64)
    assert verify_chain(rows) == 3


def test_a_long_log_verifies_page_by_page() -> None:
    rows = build(ENTRIES)
    assert verify_chain(rows[:2]) is None
    assert verify_chain(rows[2:], start=rows[1][1]) is None
    assert verify_chain(rows[2:]) == 0
