"""Request bodies in, documents out: JSON (or YAML) → validated `CityService`, and back.

Bad input is answered here, at the edge: 400 for bytes that are not JSON/YAML, 413 for a body
over `MAX_BODY`, 415 for another media type, 422 with `errors: [{field, message}]` for a
well-formed document that the schema refuses or that the registry could not store and read back.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

import yaml
from aiohttp import web
from pydantic import BaseModel, ValidationError

from cityplane.documents import DocumentError, parse_documents
from cityplane.schema import CityService
from registry.errors import (
    FieldError,
    invalid_document,
    malformed,
    too_large,
    unsupported_media_type,
)
from registry.models import OWNER_MAX

MAX_BODY = 1024 * 1024

_YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"})
# No Content-Type, or curl's text/plain: read as JSON, the API's own format.
_JSON_TYPES = frozenset({"application/json", "application/octet-stream", "text/plain", ""})
# One line of `cityplane.documents`' messages: "body:12: spec.routes.0.name: unknown field".
_DOCUMENT_LINE = re.compile(r"^body(?::(?P<line>\d+))?: (?:(?P<field>[\w.-]+): )?(?P<msg>.*)$")
# A "\ud800" escape (JSON or YAML) decodes to a lone surrogate: not a Unicode character, so no
# UTF-8 column, answer or watch event can carry it.
_SURROGATE = re.compile("[\ud800-\udfff]")

M = TypeVar("M", bound=BaseModel)


def stored_form(service: CityService) -> dict[str, Any]:
    """The document as the registry keeps it: what the client set, without resourceVersion."""
    document = service.model_dump(mode="json", by_alias=True, exclude_unset=True)
    document["metadata"].pop("resourceVersion", None)
    # apiVersion and kind are always written out, even when the client left them implicit.
    return {"apiVersion": service.apiVersion, "kind": service.kind, **document}


def field_errors(exc: ValidationError) -> list[FieldError]:
    errors: list[FieldError] = []
    for item in exc.errors(include_url=False):
        # Drop pydantic's validator tags ("function-after[…]") from the location.
        loc = [str(p) for p in item["loc"] if not (isinstance(p, str) and "[" in p)]
        message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
        message = message.removeprefix("Value error, ")
        errors.append({"field": ".".join(loc) or "(document)", "message": message})
    return errors


def validate(model: type[M], data: Any) -> M:
    if not isinstance(data, dict):
        raise invalid_document([{"field": "(document)", "message": "must be a JSON object"}])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_document(field_errors(exc)) from None


def _bad_text(text: str) -> str | None:
    if "\x00" in text:
        return "contains NUL (U+0000), which the registry cannot store"
    if _SURROGATE.search(text):
        return "contains a lone surrogate (\\ud800-\\udfff), which is not a Unicode character"
    return None


def _text_errors(value: Any, field: str) -> list[FieldError]:
    if isinstance(value, str):
        problem = _bad_text(value)
        return [{"field": field, "message": problem}] if problem else []
    errors: list[FieldError] = []
    if isinstance(value, dict):
        for key, item in value.items():
            problem = _bad_text(key)
            if problem:
                errors.append({"field": field, "message": f"the key {key!r} {problem}"})
            errors += _text_errors(item, f"{field}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            errors += _text_errors(item, f"{field}.{index}")
    return errors


def _check_storable(service: CityService) -> None:
    """Refuse a document the store could not write, or could write but not read back."""
    document = stored_form(service)
    errors = [e for key in document for e in _text_errors(document[key], key)]
    owner = service.spec.owner
    if owner is not None and len(owner) > OWNER_MAX:
        errors.append({"field": "spec.owner", "message": f"at most {OWNER_MAX} characters"})
    if errors:
        raise invalid_document(errors)
    try:
        CityService.model_validate(document)
    except ValidationError as exc:
        # The schema writes some values it accepts in a form it refuses (under 0.5 ms a duration
        # becomes "0ms", 1e6 s "1e+06s"). Stored, such a document fails every later PUT, and the
        # gateway refuses any snapshot that holds it.
        normalized = (item["input"] for item in exc.errors(include_url=False))
        raise invalid_document(
            [
                {"field": e["field"], "message": f"{e['message']} (normalized to {value!r})"}
                for e, value in zip(field_errors(exc), normalized, strict=True)
            ]
        ) from None


async def read_body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise too_large(MAX_BODY)
    try:
        # The application's client_max_size is MAX_BODY: chunked bodies stop there too.
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large(MAX_BODY) from None


def _media_type(request: web.Request) -> str:
    if "Content-Type" not in request.headers:
        return ""
    return request.content_type.lower()


def _text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise malformed("the body is not UTF-8 text") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(body: bytes) -> Any:
    if not body.strip():
        raise malformed("the body is empty; send a JSON document")
    try:
        return json.loads(_text(body), object_pairs_hook=_unique_keys, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise malformed(
            f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except ValueError as exc:
        raise malformed(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise malformed("malformed JSON: nested too deeply") from None


def _parse_yaml_service(text: str) -> CityService:
    try:
        # Syntax first, so that a broken file is a 400 and a wrong document a 422.
        count = len([n for n in yaml.compose_all(text, Loader=yaml.SafeLoader) if n is not None])
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise malformed(f"malformed YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    except RecursionError:
        raise malformed("malformed YAML: nested too deeply") from None
    if count != 1:
        raise invalid_document(
            [{"field": "(document)", "message": f"send one document, not {count}"}]
        )
    try:
        return parse_documents(text, "body")[0].service
    except DocumentError as exc:
        raise invalid_document([_yaml_error(line) for line in str(exc).splitlines()]) from None


def _yaml_error(line: str) -> FieldError:
    m = _DOCUMENT_LINE.match(line)
    if m is None:
        return {"field": "(document)", "message": line}
    message = m["msg"] + (f" (line {m['line']})" if m["line"] else "")
    field = m["field"] or ("kind" if message.startswith("kind ") else "(document)")
    return {"field": field, "message": message}


async def read_service(request: web.Request) -> CityService:
    media_type = _media_type(request)
    body = await read_body(request)
    if media_type in _YAML_TYPES:
        service = _parse_yaml_service(_text(body))
    elif media_type in _JSON_TYPES or media_type.endswith("+json"):
        service = validate(CityService, parse_json(body))
    else:
        raise unsupported_media_type(media_type)
    _check_storable(service)
    return service


async def read_model(request: web.Request, model: type[M]) -> M:
    """A small JSON (or YAML) request body, such as a lifecycle transition."""
    media_type = _media_type(request)
    body = await read_body(request)
    if media_type in _YAML_TYPES:
        try:
            data = yaml.safe_load(_text(body))
        except (yaml.YAMLError, RecursionError):
            raise malformed("malformed YAML") from None
        return validate(model, data)
    if media_type in _JSON_TYPES or media_type.endswith("+json"):
        return validate(model, parse_json(body))
    raise unsupported_media_type(media_type)
