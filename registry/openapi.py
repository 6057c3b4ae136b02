"""The OpenAPI 3.1 document of the admin API, built once at start.

The `CityService` schema is `cityplane.schema.service_json_schema()` itself; only its `$defs`
move to `components/schemas` (a `#/$defs/…` pointer inside an OpenAPI document would resolve
against the document's root, where nothing is).
"""

from __future__ import annotations

import json
from typing import Any

from cityplane.schema import API_VERSION, NAME_PATTERN, service_json_schema
from registry.instances import INSTANCE_ACTIONS, INSTANCE_ID_PATTERN, InstanceRegistration
from registry.lifecycle import LIFECYCLES, TransitionRequest
from registry.store import ADDED, DELETED, MODIFIED

_JSON = "application/json"
_PROBLEM = "application/problem+json"


def _hoist(schema: dict[str, Any], into: dict[str, Any]) -> dict[str, Any]:
    """Move `$defs` into `into` and point every `$ref` at `#/components/schemas/…`."""
    text = json.dumps(schema).replace('"#/$defs/', '"#/components/schemas/')
    moved: dict[str, Any] = json.loads(text)
    for name, definition in moved.pop("$defs", {}).items():
        if name in into:
            raise ValueError(f"two schemas named {name!r} in the OpenAPI document")
        into[name] = definition
    return moved


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _content(schema: dict[str, Any], media_type: str = _JSON) -> dict[str, Any]:
    return {"content": {media_type: {"schema": schema}}}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, **_content(_ref("Problem"), _PROBLEM)}


_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    # A name the schema refuses cannot exist: GET, DELETE and lifecycle answer 404, PUT 422.
    "schema": {"type": "string", "pattern": NAME_PATTERN},
    "example": "bus",
}
_IF_MATCH = {
    "name": "If-Match",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": 'the resourceVersion the change expects, as "<rv>" (or *)',
}
_REVISION = {"X-CityPlane-Revision": {"schema": {"type": "string", "pattern": "^[0-9]+$"}}}
# A document the registry accepts, for readers (and fuzzers, which mix examples into what they
# send); tests/registry/test_registry_fuzz.py sends it.
EXAMPLE_SERVICE = {
    "apiVersion": API_VERSION,
    "kind": "CityService",
    "metadata": {"name": "bus", "labels": {"team": "transport"}},
    "spec": {
        "version": "v2",
        "owner": "transport",
        "upstream": {
            "targets": [{"url": "http://bus.internal:8080"}],
            "timeouts": {"request": "5s"},
        },
        "routes": [{"name": "departures", "match": {"pathPrefix": "/bus/v2/", "methods": ["GET"]}}],
    },
}
EXAMPLE_INSTANCE = {"url": "http://10.0.0.5:8080", "weight": 1}
_INSTANCE_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": INSTANCE_ID_PATTERN},
    "example": "bus-7f9c.1",
}
EXAMPLE_TRANSITION = {"to": "deprecated", "sunset": "2099-12-31T00:00:00Z"}
_DOC_BODY = {
    "required": True,
    "content": {
        _JSON: {"schema": _ref("CityService"), "example": EXAMPLE_SERVICE},
        "application/yaml": {"schema": _ref("CityService")},
    },
}
_ERRORS = {
    "400": _problem("malformed JSON or YAML, or a bad query parameter"),
    "401": {
        **_problem("no token, or a token that is not valid"),
        "headers": {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}},
    },
    "403": _problem(
        "the token lacks the scope (insufficient-scope, with WWW-Authenticate), or the "
        "service belongs to another organization (not-owner)"
    ),
    "503": _problem("the identity hub's signing keys were never fetched (hub tokens only)"),
}
_WRITE_ERRORS = {
    **_ERRORS,
    "409": _problem("resourceVersion mismatch, or the name exists"),
    "413": _problem("body over 1 MiB"),
    "415": _problem("neither JSON nor YAML"),
    "422": {"description": "invalid document", **_content(_ref("InvalidDocument"), _PROBLEM)},
}


def _created() -> dict[str, Any]:
    created = _doc("created", "201")
    created["201"]["headers"]["Location"] = {"required": True, "schema": {"type": "string"}}
    return created


def _doc(description: str, status: str = "200", etag: bool = True) -> dict[str, Any]:
    headers = dict(_REVISION)
    if etag:
        headers["ETag"] = {"schema": {"type": "string"}}
    return {
        status: {"description": description, "headers": headers, **_content(_ref("CityService"))}
    }


def _paths() -> dict[str, Any]:
    list_params = [
        {
            "name": "lifecycle",
            "in": "query",
            "schema": {"type": "string", "enum": list(LIFECYCLES)},
        },
        {"name": "owner", "in": "query", "schema": {"type": "string"}},
        {
            "name": "label",
            "in": "query",
            "schema": {"type": "array", "items": {"type": "string", "pattern": "^[^=]+=.*$"}},
            "style": "form",
            "explode": True,
            "description": "key=value; repeat to require several labels",
        },
    ]
    status = _content(
        {
            "type": "object",
            "properties": {"status": {"type": "string"}, "revision": {"type": "integer"}},
            "required": ["status"],
        }
    )
    open_to_all: dict[str, Any] = {
        path: {"get": {"summary": summary, "security": [], "responses": responses}}
        for path, summary, responses in (
            ("/healthz", "Live", {"200": {"description": "live", **status}}),
            (
                "/readyz",
                "Ready: migrated and the database answers",
                {
                    "200": {"description": "ready, at this revision", **status},
                    "503": {"description": "starting, stopping or no database", **status},
                },
            ),
            (
                "/metrics",
                "Prometheus metrics",
                {
                    "200": {
                        "description": "text format",
                        **_content({"type": "string"}, "text/plain"),
                    }
                },
            ),
            (
                "/openapi.json",
                "This document",
                {"200": {"description": "OpenAPI 3.1", **_content({"type": "object"})}},
            ),
        )
    }
    return {
        **open_to_all,
        "/v1/services": {
            "get": {
                "summary": "List services (sorted by name)",
                "parameters": list_params,
                "responses": {
                    "200": {
                        "description": "services",
                        "headers": _REVISION,
                        **_content(_ref("ServiceList")),
                    },
                    **_ERRORS,
                },
            },
            "post": {
                "summary": "Create a service",
                "requestBody": _DOC_BODY,
                "responses": {**_created(), **_WRITE_ERRORS},
            },
        },
        "/v1/services/{name}": {
            "parameters": [_NAME],
            "get": {
                "summary": "Read a service",
                "responses": {**_doc("the service"), **_ERRORS, "404": _problem("no such service")},
            },
            "put": {
                "summary": "Create or replace a service (identical document: no new revision)",
                "parameters": [_IF_MATCH],
                "requestBody": _DOC_BODY,
                "responses": {**_doc("replaced"), **_doc("created", "201"), **_WRITE_ERRORS},
            },
            "delete": {
                "summary": "Delete a service",
                "parameters": [_IF_MATCH],
                "responses": {
                    **_doc("the service as it was", etag=False),
                    **_ERRORS,
                    "404": _problem("no such service"),
                    "409": _problem("resourceVersion mismatch"),
                },
            },
        },
        "/v1/services/{name}/lifecycle": {
            "parameters": [_NAME],
            "post": {
                "summary": "Move a service through draft → published → deprecated → retired",
                "parameters": [_IF_MATCH],
                "requestBody": {
                    "required": True,
                    "content": {
                        _JSON: {"schema": _ref("TransitionRequest"), "example": EXAMPLE_TRANSITION}
                    },
                },
                "responses": {
                    **_doc("the service after the transition"),
                    **_WRITE_ERRORS,
                    "404": _problem("no such service"),
                },
            },
        },
        "/v1/services/{name}/instances": {
            "parameters": [_NAME],
            "get": {
                "summary": "The instances registered for a service, healthy or not",
                "responses": {
                    "200": {"description": "instances", **_content(_ref("InstanceList"))},
                    **_ERRORS,
                    "404": _problem("no such service"),
                    "409": _problem("the service does not set spec.upstream.instances"),
                },
            },
        },
        "/v1/services/{name}/instances/{id}": {
            "parameters": [_NAME, _INSTANCE_ID],
            "put": {
                "summary": "Register an instance, or heartbeat it (within its ttl)",
                "requestBody": {
                    "required": True,
                    "content": {
                        _JSON: {
                            "schema": _ref("InstanceRegistration"),
                            "example": EXAMPLE_INSTANCE,
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "heartbeat (or an update of url/weight)",
                        "headers": _REVISION,
                        **_content(_ref("Instance")),
                    },
                    "201": {
                        "description": "registered",
                        "headers": _REVISION,
                        **_content(_ref("Instance")),
                    },
                    **_WRITE_ERRORS,
                    "404": _problem("no such service"),
                    "409": _problem("the service does not set spec.upstream.instances"),
                },
            },
            "delete": {
                "summary": "Deregister an instance",
                "responses": {
                    "204": {"description": "deregistered", "headers": _REVISION},
                    **_ERRORS,
                    "404": _problem("no such service or instance"),
                    "409": _problem("the service does not set spec.upstream.instances"),
                },
            },
        },
        "/v1/snapshot": {
            "get": {
                "summary": "Every service as gateways route it, and the revision they are at",
                "responses": {
                    "200": {
                        "description": "snapshot",
                        "headers": _REVISION,
                        **_content(_ref("Snapshot")),
                    },
                    **_ERRORS,
                },
            }
        },
        "/v1/audit": {
            "get": {
                "summary": "Audit log, newest first",
                "parameters": [
                    {"name": "service", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": 1000,
                            "default": 100,
                        },
                    },
                ],
                "responses": {
                    "200": {"description": "entries", **_content(_ref("AuditList"))},
                    **_ERRORS,
                },
            }
        },
        "/v1/watch": {
            "get": {
                "summary": "Server-Sent Events: a snapshot or the changes after `since`, then live",
                "parameters": [
                    {"name": "since", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "schema": {"type": "string", "pattern": "^[0-9]*$"},
                        "description": "wins over `since` (an EventSource reconnecting); "
                        "empty is the same as absent",
                    },
                ],
                "responses": {
                    "200": {
                        # OpenAPI 3.1 has no item schema for streams; like the tools that read
                        # event streams, `schema` here describes one event.
                        "description": "event stream; `schema` is one event",
                        "headers": _REVISION,
                        **_content(_ref("WatchEvent"), "text/event-stream"),
                    },
                    **_ERRORS,
                    "409": _problem("since is newer than the registry's revision"),
                },
            }
        },
    }


def _own_schemas() -> dict[str, Any]:
    documents = {"type": "array", "items": _ref("CityService")}
    problem = {
        "type": "object",
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "instance": {"type": "string"},
        },
    }

    def event(kind: str, data: str) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "event": {"const": kind},
                "id": {"type": "string", "pattern": "^[0-9]+$"},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": _ref(data),
                },
            },
            "required": ["event", "id", "data"],
        }

    return {
        "Change": {
            "type": "object",
            "properties": {
                "revision": {"type": "integer"},
                "type": {"enum": [ADDED, MODIFIED, DELETED]},
                "name": {"type": "string"},
                "service": {"anyOf": [_ref("CityService"), {"type": "null"}]},
            },
            "required": ["revision", "type", "name", "service"],
        },
        "WatchEvent": {"oneOf": [event("snapshot", "Snapshot"), event("change", "Change")]},
        "ServiceList": {
            "type": "object",
            "properties": {"revision": {"type": "integer"}, "items": documents},
            "required": ["revision", "items"],
        },
        "Snapshot": {
            "type": "object",
            "properties": {"revision": {"type": "integer"}, "services": documents},
            "required": ["revision", "services"],
        },
        "AuditEntry": {
            "type": "object",
            "properties": {
                "revision": {"type": "integer"},
                "at": {"type": "string", "format": "date-time"},
                "actor": {"type": "string"},
                "clientId": {"type": ["string", "null"]},
                "org": {"type": ["string", "null"]},
                "action": {"enum": ["create", "update", "lifecycle", "delete", *INSTANCE_ACTIONS]},
                "service": {"type": "string"},
                "before": {"anyOf": [_ref("CityService"), {"type": "null"}]},
                "after": {"anyOf": [_ref("CityService"), {"type": "null"}]},
            },
        },
        "Instance": {
            "type": "object",
            "properties": {
                "id": {"type": "string", "pattern": INSTANCE_ID_PATTERN},
                "url": {"type": "string"},
                "weight": {"type": "integer"},
                "healthy": {"type": "boolean"},
                "lastSeen": {"type": "string", "format": "date-time"},
            },
            "required": ["id", "url", "weight", "healthy", "lastSeen"],
        },
        "InstanceList": {
            "type": "object",
            "properties": {"items": {"type": "array", "items": _ref("Instance")}},
            "required": ["items"],
        },
        "AuditList": {
            "type": "object",
            "properties": {"items": {"type": "array", "items": _ref("AuditEntry")}},
        },
        "Problem": problem,
        "InvalidDocument": {
            "allOf": [
                _ref("Problem"),
                {
                    "type": "object",
                    "properties": {
                        "errors": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "field": {"type": "string"},
                                    "message": {"type": "string"},
                                },
                                "required": ["field", "message"],
                            },
                        }
                    },
                },
            ]
        },
    }


def openapi_document(version: str = "0.1.0") -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    schemas["CityService"] = _hoist(service_json_schema(), schemas)
    schemas["TransitionRequest"] = _hoist(TransitionRequest.model_json_schema(), schemas)
    schemas["InstanceRegistration"] = _hoist(InstanceRegistration.model_json_schema(), schemas)
    for name, schema in _own_schemas().items():
        if name in schemas:
            raise ValueError(f"two schemas named {name!r} in the OpenAPI document")
        schemas[name] = schema
    return {
        "openapi": "3.1.0",
        "info": {"title": "CityPlane registry admin API", "version": version},
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def openapi_bytes() -> bytes:
    return json.dumps(openapi_document(), separators=(",", ":")).encode()
