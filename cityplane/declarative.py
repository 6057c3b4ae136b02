"""What ``cityplane apply | get`` decide and show, as pure functions (no I/O).

:func:`plan` compares a wanted document with the stored one, :func:`diff_lines` shows the
difference, :func:`render_list`/:func:`render_one` print services. ``cityplane/commands.py``
fetches, writes and prints around them. Like ``kubectl apply``, applying the same files twice
decides ``unchanged`` the second time.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from cityplane.schema import NAME_PATTERN, CityService

Action = Literal["created", "configured", "unchanged"]
Output = Literal["table", "yaml", "json"]

# The registry changes these itself: `cityplane lifecycle` moves a service along (and stamps
# `deprecatedSince`), and may fill in the owner from the caller. A file that does not mention
# them leaves the stored values alone, so re-applying a file does not undo a deprecation (the
# same reason `kubectl apply` leaves `replicas` alone when the manifest omits it).
LIFECYCLE_FIELDS = ("lifecycle", "sunset", "deprecatedSince")
OWNER_FIELD = "owner"

_NAME = re.compile(NAME_PATTERN)


# --- pure decisions --------------------------------------------------------------------------


def normalise(service: CityService) -> dict[str, Any]:
    """The document as compared and shown: every default filled in, durations as text,
    without ``metadata.resourceVersion`` (which says when, not what)."""
    doc = service.model_dump(mode="json")
    doc["metadata"].pop("resourceVersion", None)
    return doc


def with_registry_fields(wanted: CityService, current: CityService | None) -> CityService:
    """``wanted`` with the registry-managed fields it does not mention taken from ``current``."""
    if current is None:
        return wanted
    given = wanted.spec.model_fields_set
    fields = [f for f in LIFECYCLE_FIELDS if "lifecycle" not in given]
    fields += [OWNER_FIELD] if OWNER_FIELD not in given else []
    keep = {f: v for f in fields if (v := getattr(current.spec, f)) is not None}
    if not keep:
        return wanted
    # Only what the file set plus what is kept: the write stays as sparse as the file.
    doc = wanted.model_dump(exclude_unset=True)
    doc["spec"].update(keep)
    return CityService.model_validate(doc)


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    action: Action
    desired: CityService  # what to write (without resourceVersion)
    diff: list[str]  # unified diff lines, for "configured"


def plan(wanted: CityService, current: CityService | None) -> Plan:
    name = wanted.metadata.name
    desired = with_registry_fields(wanted, current)
    desired = desired.model_copy(
        update={"metadata": desired.metadata.model_copy(update={"resourceVersion": None})}
    )
    if current is None:
        return Plan(name, "created", desired, [])
    before, after = normalise(current), normalise(desired)
    if before == after:
        return Plan(name, "unchanged", desired, [])
    return Plan(name, "configured", desired, diff_lines(name, before, after))


def document_yaml(doc: Mapping[str, Any], *, compact: bool = False) -> str:
    """Block style (one value per line: diffs show exactly what changed), or ``compact`` with
    short lists and mappings inline, for files people edit."""
    return yaml.safe_dump(
        dict(doc),
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=None if compact else False,
    )


def diff_lines(name: str, before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """A unified diff of the two documents as YAML, registry first, the file second."""
    return [
        line.rstrip("\n")
        for line in difflib.unified_diff(
            document_yaml(before).splitlines(keepends=True),
            document_yaml(after).splitlines(keepends=True),
            fromfile=f"service/{name} (registry)",
            tofile=f"service/{name} (apply)",
        )
    ]


_RED, _GREEN, _CYAN, _BOLD, _RESET = "\033[31m", "\033[32m", "\033[36m", "\033[1m", "\033[0m"


def colourise(lines: Iterable[str]) -> list[str]:
    painted = []
    for line in lines:
        if line.startswith(("---", "+++")):
            colour = _BOLD
        elif line.startswith("@@"):
            colour = _CYAN
        elif line.startswith("-"):
            colour = _RED
        elif line.startswith("+"):
            colour = _GREEN
        else:
            painted.append(line)
            continue
        painted.append(f"{colour}{line}{_RESET}")
    return painted


def _targets_cell(service: CityService, shown: int = 3) -> str:
    hosts = [urlsplit(t.url).netloc for t in service.spec.upstream.targets]
    cell = ",".join(hosts[:shown])
    return cell + (f" + {len(hosts) - shown} more..." if len(hosts) > shown else "")


def services_table(services: Sequence[CityService]) -> str:
    """Columns like ``kubectl get``: left-aligned, three spaces apart, no borders."""
    rows = [("NAME", "VERSION", "LIFECYCLE", "ROUTES", "TARGETS")]
    rows.extend(
        (
            s.metadata.name,
            s.spec.version,
            s.spec.lifecycle,
            str(len(s.spec.routes)),
            _targets_cell(s),
        )
        for s in services
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "   " + row[-1]
        for row in rows
    )


def shown(service: CityService) -> dict[str, Any]:
    """A document as `get` prints it: the fields the registry sent (it keeps documents as
    written, defaults left out), resourceVersion included."""
    doc = service.model_dump(mode="json", exclude_unset=True)
    return {"apiVersion": service.apiVersion, "kind": service.kind, **doc}


def render_list(services: Sequence[CityService], output: Output, revision: int) -> str:
    """``table``; ``yaml``: a multi-document stream that ``apply -f`` takes back as is;
    ``json``: the API's own shape, ``{"revision": N, "items": [...]}``."""
    if output == "table":
        return services_table(services)
    if output == "json":
        return json.dumps({"revision": revision, "items": [shown(s) for s in services]}, indent=2)
    return "---\n".join(document_yaml(shown(s)) for s in services).rstrip("\n")


def render_one(service: CityService, output: Output) -> str:
    if output == "table":
        return services_table([service])
    if output == "json":
        return json.dumps(shown(service), indent=2)
    return document_yaml(shown(service)).rstrip("\n")


def parse_labels(selectors: Iterable[str]) -> dict[str, str]:
    """``-l key=value`` (repeatable, or comma-separated as in kubectl) to a mapping."""
    labels: dict[str, str] = {}
    for selector in selectors:
        for part in selector.split(","):
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"-l {selector!r}: expected key=value")
            labels[key.strip()] = value.strip()
    return labels


def has_labels(service: CityService, labels: Mapping[str, str]) -> bool:
    return all(service.metadata.labels.get(k) == v for k, v in labels.items())


def parse_sunset(text: str) -> datetime:
    """``2027-06-30`` (midnight UTC) or an ISO 8601 date-time; without an offset, UTC."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"--sunset {text!r}: expected a date (2027-06-30) or date-time (2027-06-30T12:00:00Z)"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(
            f"{name!r} is not a service name (lowercase letters, digits and '-', at most 63)"
        )
    return name
