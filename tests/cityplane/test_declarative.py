"""What `cityplane apply` decides, and how `get` shows services: pure functions, no registry."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from cityplane.commands import Console
from cityplane.declarative import (
    check_name,
    colourise,
    normalise,
    parse_labels,
    parse_sunset,
    plan,
    render_list,
    render_one,
    services_table,
)
from cityplane.documents import parse_documents
from cityplane.schema import CityService

FILE = """
apiVersion: cityplane.io/v1alpha1
kind: CityService
metadata: {name: bus-times, labels: {department: transport}}
spec:
  upstream:
    targets: [{url: "http://127.0.0.1:9001", weight: 2}]
    timeouts: {connect: 250ms, request: 10s}
  routes:
    - name: read
      match: {pathPrefix: /bus/, methods: [GET]}
"""


def from_file(text: str = FILE) -> CityService:
    return parse_documents(text)[0].service


def stored(service: CityService, rv: str = "7", **spec: Any) -> CityService:
    """The service as the registry would send it back: every field, a resourceVersion."""
    doc = service.model_dump(mode="json")
    doc["metadata"]["resourceVersion"] = rv
    doc["spec"].update(spec)
    return CityService.model_validate(doc)


def test_absent_service_is_created_without_a_resource_version() -> None:
    wanted = from_file(FILE.replace("name: bus-times,", "name: bus-times, resourceVersion: '3',"))
    step = plan(wanted, None)
    assert step.action == "created"
    assert step.desired.metadata.resourceVersion is None
    assert step.diff == []


def test_same_document_is_unchanged_whatever_the_resource_version_and_duration_spelling() -> None:
    wanted = from_file()
    current = stored(wanted, rv="41")
    # The registry spells durations its own way; the comparison goes through the model.
    assert current.model_dump(mode="json")["spec"]["upstream"]["timeouts"]["connect"] == "250ms"
    assert plan(wanted, current).action == "unchanged"
    assert "resourceVersion" not in normalise(current)["metadata"]


def test_changed_weight_is_configured_with_a_diff_of_just_that_line() -> None:
    current = stored(from_file())
    wanted = from_file(FILE.replace("weight: 2", "weight: 5"))
    step = plan(wanted, current)
    assert step.action == "configured"
    assert step.diff[:2] == [
        "--- service/bus-times (registry)",
        "+++ service/bus-times (apply)",
    ]
    changed = [line for line in step.diff[2:] if line[:1] in "+-"]
    assert changed == ["-      weight: 2", "+      weight: 5"]


def test_lifecycle_set_by_the_registry_survives_a_file_that_does_not_mention_it() -> None:
    sunset = datetime(2027, 6, 30, tzinfo=UTC)
    current = stored(
        from_file(),
        lifecycle="deprecated",
        sunset=sunset.isoformat(),
        deprecatedSince="2026-01-01T00:00:00Z",
        owner="transport-dept",
    )
    step = plan(from_file(), current)
    assert step.action == "unchanged"
    assert step.desired.spec.lifecycle == "deprecated"
    assert step.desired.spec.sunset == sunset
    assert step.desired.spec.owner == "transport-dept"


def test_lifecycle_written_in_the_file_is_the_file_s_to_decide() -> None:
    current = stored(from_file(), lifecycle="deprecated", sunset="2027-06-30T00:00:00Z")
    wanted = from_file(FILE.replace("spec:\n", "spec:\n  lifecycle: published\n"))
    step = plan(wanted, current)
    assert step.action == "configured"
    assert step.desired.spec.lifecycle == "published"
    assert step.desired.spec.sunset is None  # lifecycle, sunset and deprecatedSince go together
    assert "-  lifecycle: deprecated" in step.diff and "+  lifecycle: published" in step.diff


def test_diff_is_coloured_only_for_a_terminal() -> None:
    lines = ["--- a", "+++ b", "@@ -1 +1 @@", "-old", "+new", " same"]
    assert colourise(lines) == [
        "\033[1m--- a\033[0m",
        "\033[1m+++ b\033[0m",
        "\033[36m@@ -1 +1 @@\033[0m",
        "\033[31m-old\033[0m",
        "\033[32m+new\033[0m",
        " same",
    ]
    plain, tty = io.StringIO(), io.StringIO()
    Console(plain, io.StringIO(), colour=False).lines(lines)
    Console(tty, io.StringIO(), colour=True).lines(lines)
    assert "\033[" not in plain.getvalue() and plain.getvalue().splitlines() == lines
    assert "\033[31m-old" in tty.getvalue()


def test_table_has_kubectl_columns_and_shortens_long_target_lists() -> None:
    many = FILE.replace(
        'targets: [{url: "http://127.0.0.1:9001", weight: 2}]',
        "targets: [" + ", ".join(f"{{url: 'http://10.0.0.{i}:80'}}" for i in range(1, 6)) + "]",
    )
    services = [
        from_file(),
        stored(from_file(many.replace("bus-times", "parking-v2")), lifecycle="deprecated"),
    ]
    assert services_table(services).splitlines() == [
        "NAME         VERSION   LIFECYCLE    ROUTES   TARGETS",
        "bus-times    v1        published    1        127.0.0.1:9001",
        "parking-v2   v1        deprecated   1        "
        "10.0.0.1:80,10.0.0.2:80,10.0.0.3:80 + 2 more...",
    ]


def test_yaml_of_a_list_is_a_stream_that_apply_reads_back() -> None:
    services = [stored(from_file()), stored(from_file(FILE.replace("bus-times", "trams")), "9")]
    text = render_list(services, "yaml", revision=12)
    back = [located.service for located in parse_documents(text)]
    assert back == services  # resourceVersion included: `get` shows what is stored
    assert [plan(b, s).action for b, s in zip(back, services, strict=True)] == ["unchanged"] * 2
    json_text = render_list(services, "json", revision=12)
    assert json_text.startswith('{\n  "revision": 12,\n  "items": [')
    assert render_one(services[0], "yaml").startswith("apiVersion: cityplane.io/v1alpha1\n")


def test_label_selectors_parse_like_kubectl_and_reject_nonsense() -> None:
    assert parse_labels(["department=transport", "tier=gold,zone=north"]) == {
        "department": "transport",
        "tier": "gold",
        "zone": "north",
    }
    with pytest.raises(ValueError, match="expected key=value"):
        parse_labels(["department"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2027-06-30", datetime(2027, 6, 30, tzinfo=UTC)),
        ("2027-06-30T12:30:00Z", datetime(2027, 6, 30, 12, 30, tzinfo=UTC)),
        ("2027-06-30T12:30:00", datetime(2027, 6, 30, 12, 30, tzinfo=UTC)),
        (
            "2027-06-30T12:30:00+02:00",
            datetime(2027, 6, 30, 12, 30, tzinfo=timezone(timedelta(hours=2))),
        ),
    ],
)
def test_sunset_takes_a_date_or_a_date_time(text: str, expected: datetime) -> None:
    assert parse_sunset(text) == expected


def test_sunset_that_is_not_a_date_says_what_it_wants() -> None:
    with pytest.raises(ValueError, match="expected a date"):
        parse_sunset("next summer")


def test_service_names_are_checked_before_they_reach_a_url() -> None:
    assert check_name("bus-times") == "bus-times"
    for bad in ("../admin", "Bus", "-x", "a" * 64, ""):
        with pytest.raises(ValueError, match="not a service name"):
            check_name(bad)
