"""A hash chain over the audit log: each entry's hash covers the previous hash and the entry.

``hash_n = SHA-256(hash_{n-1} || canonical(entry_n))`` with ``hash_0 = GENESIS``, in the manner
of RFC 6962 §2.1's Merkle tree leaves and of a blockchain, but linear: altering, deleting,
inserting or reordering any stored entry changes every later hash, which :func:`verify_chain`
finds. Truncating the *end* of the log is not visible from the rows alone; publish or copy
the latest hash elsewhere (a metric, a periodic log line, another store) to cover that.

The canonical form is JSON with sorted keys and no whitespace (close to RFC 8785 JCS for the
values an audit entry holds: strings, integers, booleans, null, lists and objects; floats
should be avoided or stored as text, as their JSON spelling is not canonical across languages).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from typing import Any

GENESIS = "0" * 64


def canonical(entry: Mapping[str, Any]) -> bytes:
    """The bytes an entry is hashed as: sorted keys, compact separators, UTF-8."""
    return json.dumps(
        entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def chain_hash(prev_hash: str, entry: Mapping[str, Any]) -> str:
    """SHA-256 hex of ``prev_hash`` (as ASCII hex) followed by ``canonical(entry)``."""
    return hashlib.sha256(prev_hash.encode("ascii") + canonical(entry)).hexdigest()


def verify_chain(rows: Iterable[tuple[Mapping[str, Any], str]], start: str = GENESIS) -> int | None:
    """The index of the first ``(entry, stored_hash)`` row that does not chain; None if all do.

    ``start`` is the hash before the first row, so a long log can be checked in pages.
    """
    previous = start
    for index, (entry, stored) in enumerate(rows):
        expected = chain_hash(previous, entry)
        if not hmac.compare_digest(expected, stored):
            return index
        previous = stored
    return None
