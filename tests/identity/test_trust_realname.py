"""Resident IDs (GB 11643-1999) and real-name verification against the file authority."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
from pathlib import Path

import pytest

from identity.trust.realname import (
    AuthorityUnavailable,
    FileRealNameAuthority,
    RealNameAuthority,
)
from identity.trust.resident_id import InvalidResidentId, parse_resident_id


def with_check(first17: str) -> str:
    """The check character per GB 11643-1999 §8.2 (ISO 7064 MOD 11-2), computed here by the
    defining formula rather than a lookup table: the check a_1 makes sum(a_i * 2^(i-1)) ≡ 1."""
    total = sum(int(d) * (2 ** (17 - i) % 11) for i, d in enumerate(first17))
    check = (12 - total % 11) % 11
    return first17 + ("X" if check == 10 else str(check))


# Made-up numbers, valid by construction.
WANG = with_check("11010519491231002")  # Beijing Dongcheng, 1949-12-31
LI = with_check("44030620000229123")  # Shenzhen, a leap day
WITH_X = next(
    with_check(f"3201021985061{seq:03d}1"[:17])
    for seq in range(1000)
    if with_check(f"3201021985061{seq:03d}1"[:17]).endswith("X")
)


def test_the_check_helper_agrees_with_a_published_example() -> None:
    # GB 11643-1999 Appendix A example number.
    assert with_check("11010519491231002") == "11010519491231002X"


def test_a_valid_id_parses_into_its_parts() -> None:
    rid = parse_resident_id(WANG)
    assert rid.value == WANG
    assert rid.birth_date == datetime.date(1949, 12, 31)
    assert rid.region_code == "110105"
    assert rid.masked() == "110105********002X"
    assert WANG not in repr(rid) and WANG not in str(rid)


@pytest.mark.parametrize(
    "text",
    [
        WITH_X.lower(),
        f"  {WITH_X}  ",
        "".join(chr(ord(c) + 0xFEE0) for c in WITH_X),  # full-width, as some IMEs type it
    ],
)
def test_lower_case_x_spaces_and_full_width_digits_are_accepted(text: str) -> None:
    assert parse_resident_id(text).value == WITH_X


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "18 characters"),
        (WANG[:-1], "18 characters"),
        (WANG + "1", "18 characters"),
        ("1101051949123100A2", "digits"),
        (WANG[:17] + "Y", "digit or X"),
        (WANG[:17] + ("1" if WANG[17] != "1" else "2"), "check character"),
        (with_check("00010519491231002"), "region code"),
        (with_check("11010519491331002"), "not a date"),
        (with_check("11010520010229002"), "not a date"),
        (with_check("11010518991231002"), "out of range"),
        (with_check("11010530000101002"), "out of range"),
    ],
)
def test_invalid_ids_are_refused_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(InvalidResidentId, match=reason):
        parse_resident_id(text)


def test_one_changed_digit_is_caught_by_the_check_character() -> None:
    for position in range(17):
        digit = int(LI[position])
        typo = LI[:position] + str((digit + 1) % 10) + LI[position + 1 :]
        with pytest.raises(InvalidResidentId):
            parse_resident_id(typo)


def test_the_fingerprint_is_keyed_and_stable() -> None:
    rid = parse_resident_id(WANG)
    first = rid.fingerprint(b"pepper-1")
    assert first == parse_resident_id(WANG.lower()).fingerprint(b"pepper-1")
    assert first != rid.fingerprint(b"pepper-2")
    assert first != parse_resident_id(LI).fingerprint(b"pepper-1")
    assert len(first) == 64 and WANG not in first


def write_registry(path: Path, records: list[dict[str, str]]) -> None:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")


async def test_the_file_authority_matches_name_and_id(tmp_path: Path) -> None:
    registry = tmp_path / "people.json"
    write_registry(registry, [{"name": "王小明", "id": WANG}, {"name": "Lǐ Nà", "id": LI}])
    authority: RealNameAuthority = FileRealNameAuthority(registry)

    hit = await authority.verify(" 王小明 ", parse_resident_id(WANG))
    assert hit.matched and hit.reason is None and hit.authority == "file:people.json"
    # The same name typed with a combining accent (NFD) matches the NFC record.
    assert (await authority.verify("Li\u030c Na\u0300", parse_resident_id(LI))).matched
    assert not (await authority.verify("Li Na", parse_resident_id(LI))).matched

    wrong_name = await authority.verify("王大明", parse_resident_id(WANG))
    assert not wrong_name.matched and wrong_name.reason == "name does not match the record"
    unknown = await authority.verify("王小明", parse_resident_id(WITH_X))
    assert not unknown.matched and unknown.reason == "no record for this resident ID"


async def test_the_file_authority_reads_yaml_and_reloads_when_the_file_changes(
    tmp_path: Path,
) -> None:
    registry = tmp_path / "people.yaml"
    registry.write_text(f"records:\n  - {{name: 张三, id: '{WANG}'}}\n", encoding="utf-8")
    authority = FileRealNameAuthority(registry)
    assert (await authority.verify("张三", parse_resident_id(WANG))).matched
    assert not (await authority.verify("李四", parse_resident_id(LI))).matched

    registry.write_text(
        f"records:\n  - {{name: 张三, id: '{WANG}'}}\n  - {{name: 李四, id: '{LI}'}}\n",
        encoding="utf-8",
    )
    stat = registry.stat()
    os.utime(registry, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert (await authority.verify("李四", parse_resident_id(LI))).matched


async def test_a_missing_or_broken_registry_is_an_outage_not_a_mismatch(tmp_path: Path) -> None:
    authority = FileRealNameAuthority(tmp_path / "absent.json")
    with pytest.raises(AuthorityUnavailable):
        await authority.verify("王小明", parse_resident_id(WANG))

    broken = tmp_path / "broken.json"
    broken.write_text("[{", encoding="utf-8")
    with pytest.raises(AuthorityUnavailable):
        await FileRealNameAuthority(broken).verify("王小明", parse_resident_id(WANG))

    bad_id = tmp_path / "bad-id.json"
    write_registry(bad_id, [{"name": "王小明", "id": "123"}])
    with pytest.raises(AuthorityUnavailable, match="record 0"):
        await FileRealNameAuthority(bad_id).verify("王小明", parse_resident_id(WANG))


async def test_concurrent_checks_read_the_registry_once(tmp_path: Path) -> None:
    registry = tmp_path / "people.json"
    write_registry(registry, [{"name": "王小明", "id": WANG}])
    authority = FileRealNameAuthority(registry)
    reads = 0
    real_read = authority._read

    def counting_read() -> dict[str, str]:
        nonlocal reads
        reads += 1
        return real_read()

    authority._read = counting_read  # type: ignore[method-assign]
    rid = parse_resident_id(WANG)
    results = await asyncio.gather(*(authority.verify("王小明", rid) for _ in range(20)))
    assert all(r.matched for r in results)
    assert reads == 1
