"""`cityplane import-openapi`: existing OpenAPI 3.0/3.1 documents become CityService files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cityplane.cli import main
from cityplane.documents import parse_documents
from cityplane.openapi_import import (
    OpenApiError,
    import_openapi,
    load_spec,
    route_name,
    service_yaml,
    unique_names,
)

# The kind of document a city's transport department already publishes: server variables,
# path parameters, shared components, an OAuth2 scheme with read/write scopes, a public
# health check and an endpoint only an API key protects.
BUS_OPENAPI_30 = """
openapi: 3.0.3
info:
  title: Bus times
  version: 2.4.1
  description: Real-time arrivals for the city's bus network.
servers:
  - url: https://api.city.example/{department}/v2
    variables:
      department: {default: bus, enum: [bus, tram]}
  - url: http://localhost:8080/bus/v2
security:
  - cityOAuth: [bus:read]
paths:
  /stops:
    summary: Bus stops
    get:
      operationId: listStops
      parameters:
        - {name: near, in: query, schema: {type: string}}
      responses:
        '200': {description: stops, content: {application/json: {schema: {type: array}}}}
    post:
      operationId: createStop
      security: [{cityOAuth: [bus:read, bus:write]}]
      requestBody: {content: {application/json: {schema: {$ref: '#/components/schemas/Stop'}}}}
      responses: {'201': {description: created}}
  /stops/{stopId}:
    parameters:
      - {name: stopId, in: path, required: true, schema: {type: string}}
    get:
      operationId: getStop
      responses: {'200': {description: one stop}}
    delete:
      operationId: deleteStop
      security: [{cityOAuth: [bus:write]}]
      responses: {'204': {description: gone}}
  /stops/{stopId}/arrivals:
    get:
      operationId: listArrivals
      responses: {'200': {description: arrivals}}
  /healthz:
    get:
      operationId: health_check
      security: []
      responses: {'200': {description: ok}}
  /legacy/timetable.csv:
    get:
      security: [{partnerKey: []}]
      responses: {'200': {description: csv}}
    trace:
      responses: {'200': {description: echo}}
components:
  schemas:
    Stop: {type: object, properties: {id: {type: string}, name: {type: string}}}
  securitySchemes:
    cityOAuth:
      type: oauth2
      flows:
        clientCredentials:
          tokenUrl: https://id.city.example/token
          scopes: {bus:read: read, bus:write: write}
    partnerKey: {type: apiKey, in: header, name: X-Partner-Key}
"""

# OpenAPI 3.1: JSON, path items shared through components.pathItems, webhooks (not routed),
# an http bearer scheme, no servers, a date as the version.
PARKING_OPENAPI_31: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Parking", "version": "2026-01-15"},
    "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
    "paths": {
        "/parking/zones": {"$ref": "#/components/pathItems/Zones"},
        "/parking/zones/{zoneId}/spaces/{spaceId}": {
            "get": {"operationId": "GetSpace", "security": [{"bearer": []}]},
            "put": {"operationId": "reserve_space", "security": [{"bearer": []}]},
        },
        "/": {"get": {}},
    },
    "webhooks": {"spaceFreed": {"post": {"operationId": "spaceFreed"}}},
    "components": {
        "pathItems": {"Zones": {"get": {"operationId": "listZones"}}},
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
}


def routes(service: Any) -> list[dict[str, Any]]:
    return [r.model_dump(mode="json", exclude_defaults=True) for r in service.spec.routes]


def test_openapi_30_document_becomes_routes_per_match_and_credential() -> None:
    imported = import_openapi(
        load_spec(BUS_OPENAPI_30, "bus.yaml"), name="bus-times", upstream="http://bus:8080"
    )
    service = imported.service
    assert service.metadata.name == "bus-times"
    assert service.metadata.annotations == {
        "cityplane.io/openapi-title": "Bus times",
        "cityplane.io/openapi-version": "2.4.1",
    }
    assert service.spec.version == "v2"
    assert service.spec.lifecycle == "published"  # not written: the registry's default applies
    assert [t.url for t in service.spec.upstream.targets] == ["http://bus:8080"]
    read = {"scopes": ["bus:read"]}
    assert routes(service) == [
        {
            "name": "list-stops",
            "match": {"path": "/bus/v2/stops", "methods": ["GET"]},
            "auth": read,
        },
        {
            "name": "create-stop",
            "match": {"path": "/bus/v2/stops", "methods": ["POST"]},
            "auth": {"scopes": ["bus:read", "bus:write"]},
        },
        # /stops/{stopId} and /stops/{stopId}/arrivals share the prefix and the credential.
        {
            "name": "stops-stop-id-get",
            "match": {"pathPrefix": "/bus/v2/stops/", "methods": ["GET"]},
            "auth": read,
        },
        {
            "name": "delete-stop",
            "match": {"pathPrefix": "/bus/v2/stops/", "methods": ["DELETE"]},
            "auth": {"scopes": ["bus:write"]},
        },
        {"name": "health-check", "match": {"path": "/bus/v2/healthz", "methods": ["GET"]}},
        {
            "name": "legacy-timetable-csv",
            "match": {"path": "/bus/v2/legacy/timetable.csv", "methods": ["GET"]},
        },
    ]
    assert imported.warnings == [
        "TRACE /legacy/timetable.csv skipped: the gateway does not route TRACE",
        "operations secured only by API keys or basic auth are routed without gateway auth; "
        "the upstream keeps checking those credentials",
    ]


def test_openapi_31_json_with_path_item_refs_and_bearer_scheme() -> None:
    spec = load_spec(json.dumps(PARKING_OPENAPI_31), "parking.json")
    imported = import_openapi(spec, name="parking", upstream="https://parking.internal:8443")
    service = imported.service
    assert service.spec.version == "v1"  # a date is not a major version
    assert routes(service) == [
        {"name": "list-zones", "match": {"path": "/parking/zones", "methods": ["GET"]}},
        {
            "name": "parking-zones-zone-id-spaces-space-id",
            "match": {"pathPrefix": "/parking/zones/", "methods": ["GET", "PUT"]},
            "auth": {},  # required, no particular scope
        },
        {"name": "root", "match": {"path": "/", "methods": ["GET"]}},
    ]
    assert service.spec.routes[1].auth is not None and service.spec.routes[1].auth.required
    assert imported.warnings == []


def test_printed_yaml_reads_back_as_the_same_service() -> None:
    imported = import_openapi(
        load_spec(BUS_OPENAPI_30), name="bus-times", upstream="http://bus:8080", lifecycle="draft"
    )
    text = service_yaml(imported, "bus.yaml")
    assert text.startswith("# Imported from bus.yaml by cityplane import-openapi\n")
    assert "    methods: [GET]\n" in text  # compact enough to edit by hand
    [located] = parse_documents(text)
    assert located.service == imported.service
    assert located.service.spec.lifecycle == "draft"


def test_prefix_flag_replaces_the_server_path_and_warns_about_forwarding() -> None:
    imported = import_openapi(
        load_spec(BUS_OPENAPI_30), name="bus", upstream="http://bus:8080", prefix="/transit/bus/"
    )
    assert imported.service.spec.routes[0].match.path == "/transit/bus/stops"
    assert any("upstream receives /transit/bus/" in w for w in imported.warnings)
    same = import_openapi(
        load_spec(BUS_OPENAPI_30), name="bus", upstream="http://bus:8080", prefix="/bus/v2"
    )
    assert not any("--prefix" in w for w in same.warnings)


def test_operations_needing_different_scopes_under_one_prefix_and_method_merge_weaker() -> None:
    spec = load_spec(
        """
openapi: 3.0.0
info: {title: t, version: '1'}
components: {securitySchemes: {o: {type: openIdConnect, openIdConnectUrl: https://id/x}}}
paths:
  /records/{id}: {get: {security: [{o: [records:read]}]}}
  /records/{id}/secret: {get: {security: [{o: [records:read, records:admin]}]}}
  /records/{id}/public: {get: {}}
  /audit/{id}: {get: {security: [{o: [audit:read]}]}}
  /audit/{id}/full: {get: {security: [{o: [audit:read, audit:full]}]}}
"""
    )
    imported = import_openapi(spec, name="records", upstream="http://records:80")
    assert routes(imported.service) == [
        {"name": "records-id", "match": {"pathPrefix": "/records/", "methods": ["GET"]}},
        {
            "name": "audit-id",
            "match": {"pathPrefix": "/audit/", "methods": ["GET"]},
            "auth": {"scopes": ["audit:read"]},
        },
    ]
    assert len([w for w in imported.warnings if "need different credentials" in w]) == 3


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("getStopArrivals", "get-stop-arrivals"),
        ("get_stop.arrivals", "get-stop-arrivals"),
        ("HTTPServerStatus", "http-server-status"),
        ("  Straßen-Übersicht  ", "strassen-ubersicht"),
        ("--weird__ID--", "weird-id"),
        ("x" * 80, "x" * 63),
        ("a" + "-" * 70 + "b", "a-b"),
        ("日本", ""),
    ],
)
def test_route_names_are_sanitized_to_the_schema_pattern(raw: str, name: str) -> None:
    assert route_name(raw) == name


def test_names_are_made_unique_within_63_characters() -> None:
    long = "n" * 63
    assert unique_names(["stops", "stops", "stops", long, long]) == [
        "stops",
        "stops-2",
        "stops-3",
        long,
        "n" * 61 + "-2",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("openapi: 3.0.0\npaths: {/x: [}\n", "spec.yaml:2: malformed YAML"),
        ("- just\n- a list\n", "expected a mapping"),
        ("swagger: '2.0'\npaths: {}\n", "Swagger 2.0 is not supported"),
        ("openapi: 4.0.0\npaths: {/x: {get: {}}}\n", "'openapi' must be a 3.x"),
        ("openapi: 3.1.0\ninfo: {title: t}\n", "no 'paths'"),
        ("openapi: 3.1.0\npaths: {stops: {get: {}}}\n", "must start with '/'"),
        ("openapi: 3.1.0\npaths: {/a/../b: {get: {}}}\n", "must be a normalized path"),
        ("openapi: 3.1.0\npaths: {/a: {$ref: 'other.yaml#/x'}}\n", "only local"),
        ("openapi: 3.1.0\npaths: {/a: {summary: nothing}}\n", "no operations"),
        ("openapi: 3.1.0\npaths: {/a: {get: {security: {o: []}}}}\n", "must be a list"),
        (
            "openapi: 3.1.0\nservers: [{url: 'https://x/{v}'}]\npaths: {/a: {get: {}}}\n",
            "variable without a default",
        ),
    ],
)
def test_documents_that_cannot_be_imported_say_why(text: str, message: str) -> None:
    with pytest.raises(OpenApiError, match=message.replace("'", ".").replace("(", r"\(")):
        import_openapi(load_spec(text, "spec.yaml"), name="x", upstream="http://x:1", where="s")


def test_cli_writes_the_service_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "bus.yaml"
    spec.write_text(BUS_OPENAPI_30)
    out = tmp_path / "bus-times.yaml"
    args = ["--name", "bus-times", "--upstream", "http://bus:8080", "-o", str(out)]
    code = main(["import-openapi", str(spec), *args])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out == f"service/bus-times: 6 routes written to {out}\n"
    assert captured.err.count("cityplane: warning: ") == 2
    assert parse_documents(out.read_text())[0].service.metadata.name == "bus-times"


def test_cli_prints_to_stdout_without_o(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "parking.json"
    spec.write_text(json.dumps(PARKING_OPENAPI_31))
    assert main(["import-openapi", str(spec), "--name", "parking", "--upstream", "http://p:1"]) == 0
    assert parse_documents(capsys.readouterr().out)[0].service.metadata.name == "parking"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--name", "Bus!", "--upstream", "http://b:1"], 2, "'Bus!' is not a service name"),
        (["--name", "bus", "--upstream", "ftp://b"], 2, "--upstream: Value error"),
        (["--name", "bus", "--upstream", "http://b:1", "--prefix", "x"], 2, "must start with '/'"),
    ],
)
def test_cli_bad_flags_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], code: int, message: str
) -> None:
    spec = tmp_path / "bus.yaml"
    spec.write_text(BUS_OPENAPI_30)
    assert main(["import-openapi", str(spec), *args]) == code
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1


def test_cli_malformed_or_missing_spec_is_one_line_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "broken.yaml"
    spec.write_text("openapi: 3.0.0\npaths:\n  /x: {get: [}\n")
    base = ["--name", "x", "--upstream", "http://x:1"]
    assert main(["import-openapi", str(spec), *base]) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"cityplane: {spec}:3: malformed YAML: ") and err.count("\n") == 1
    assert main(["import-openapi", str(tmp_path / "nope.yaml"), *base]) == 3
    err = capsys.readouterr().err
    assert err == f"cityplane: {tmp_path / 'nope.yaml'}: No such file or directory\n"


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path: Path) -> None:
    """`cityplane import-openapi spec.yaml | head -1`: no traceback about a broken pipe."""
    spec = tmp_path / "bus.yaml"
    spec.write_text(BUS_OPENAPI_30)
    args = ["import-openapi", str(spec), "--name", "bus", "--upstream", "http://bus:1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cityplane.cli", *args],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # long before the interpreter has started and written anything
    assert proc.wait(timeout=30) == 141
    assert "Traceback" not in proc.stderr.read()
