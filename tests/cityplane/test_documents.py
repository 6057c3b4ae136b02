from pathlib import Path

import pytest

from cityplane.documents import DocumentError, load_documents, parse_documents
from cityplane.schema import CityService, parse_duration, service_json_schema

GOOD = """\
apiVersion: cityplane.io/v1alpha1
kind: CityService
metadata: {name: bus-times}
spec:
  version: v1
  lifecycle: published
  upstream:
    targets: [{url: "http://127.0.0.1:9001", weight: 1}]
    loadBalancing: round-robin
    healthCheck: {path: /healthz, interval: 5s}
    timeouts: {connect: 1s, request: 10s}
    retries: {attempts: 2}
    circuitBreaker: {failureThreshold: 5, resetTimeout: 10s}
  routes:
    - name: read
      match: {pathPrefix: /bus/, methods: [GET], host: null}
      stripPrefix: true
      rateLimit: {requests: 100, window: 1s, key: consumer, onStoreError: open}
"""


def test_the_architecture_example_document_is_valid() -> None:
    [doc] = parse_documents(GOOD, "bus.yaml")
    svc = doc.service
    assert svc.spec.upstream.timeouts.request == 10.0
    assert svc.spec.routes[0].rateLimit is not None
    assert svc.spec.routes[0].rateLimit.window == 1.0
    assert doc.source == "bus.yaml:1"


def test_unknown_field_is_named_with_file_and_line() -> None:
    text = GOOD.replace("      stripPrefix: true\n", "      stripPrefix: true\n      colour: red\n")
    with pytest.raises(DocumentError) as err:
        parse_documents(text, "bus.yaml")
    assert str(err.value) == "bus.yaml:18: spec.routes.0.colour: unknown field"


def test_bad_value_names_field_and_line() -> None:
    text = GOOD.replace("connect: 1s", "connect: soon")
    with pytest.raises(DocumentError, match=r"bus.yaml:11: spec.upstream.timeouts.connect"):
        parse_documents(text, "bus.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [1, 2", "malformed YAML"),
        ("a: 1\na: 2\n", "duplicate key 'a'"),
        ("- 1\n- 2\n", "must be a mapping"),
        ("kind: Deployment\n", "kind must be 'CityService'"),
        ("kind: CityService\nmetadata: {name: Bad_Name}\n", "metadata.name"),
    ],
)
def test_malformed_documents_get_one_clear_message(text: str, message: str) -> None:
    with pytest.raises(DocumentError, match=message):
        parse_documents(text, "x.yaml")


def test_several_documents_per_file_and_duplicate_names_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD + "---\n" + GOOD.replace("bus-times", "trams"))
    assert [s.metadata.name for s in load_documents([tmp_path])] == ["bus-times", "trams"]
    (tmp_path / "b.yml").write_text(GOOD)
    with pytest.raises(DocumentError, match="already defined at"):
        load_documents([tmp_path])


def test_missing_file_is_a_document_error(tmp_path: Path) -> None:
    with pytest.raises(DocumentError, match="no such file"):
        load_documents([tmp_path / "nope.yaml"])


@pytest.mark.parametrize(
    ("value", "seconds"), [("250ms", 0.25), ("1s", 1.0), ("1.5s", 1.5), ("2m", 120.0), (3, 3.0)]
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


def test_route_paths_must_be_normalized() -> None:
    text = GOOD.replace("pathPrefix: /bus/", "pathPrefix: /bus/../admin")
    with pytest.raises(DocumentError, match="normalized path"):
        parse_documents(text, "x.yaml")


def test_json_schema_is_generated_from_the_models() -> None:
    schema = service_json_schema()
    assert schema["title"] == "CityService"
    assert "ServiceSpec" in schema["$defs"]
    assert schema["$defs"]["Route"]["additionalProperties"] is False


def test_documents_round_trip_through_json() -> None:
    [doc] = parse_documents(GOOD)
    again = CityService.model_validate(doc.service.model_dump(mode="json"))
    assert again == doc.service


@pytest.mark.parametrize("value", ["0.0001s", "0s", "1e300", float("inf"), "99999999999s", True])
def test_durations_out_of_range_are_refused(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize("text", ["1ms", "250ms", "1.5ms", "1s", "1.25s", "1234567s", "2m", "90s"])
def test_durations_read_back_after_writing(text: str) -> None:
    from pydantic import TypeAdapter

    from cityplane.schema import Duration

    adapter = TypeAdapter(Duration)
    seconds = adapter.validate_python(text)
    written = adapter.dump_python(seconds, mode="json")
    assert adapter.validate_python(written) == pytest.approx(seconds, abs=1e-6)
