"""The registry's problems (RFC 9457): one constructor per `type` the API contract names."""

from __future__ import annotations

from typing import TypedDict

from cityplane.problem import Problem


class FieldError(TypedDict):
    field: str
    message: str


def not_found(name: str) -> Problem:
    return Problem(404, "not-found", f"service {name!r} does not exist")


def instance_not_found(name: str, instance: str) -> Problem:
    return Problem(404, "not-found", f"instance {instance!r} of service {name!r} does not exist")


def instances_not_enabled(name: str) -> Problem:
    return Problem(
        409,
        "instances-not-enabled",
        f"service {name!r} does not let instances register: set spec.upstream.instances",
    )


def conflict(detail: str) -> Problem:
    return Problem(409, "conflict", detail)


def invalid_document(errors: list[FieldError]) -> Problem:
    first = errors[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    detail = f"{first['field']}: {first['message']}{more}"
    return Problem(422, "invalid-document", detail, errors=errors)


def invalid_transition(detail: str) -> Problem:
    return Problem(422, "invalid-transition", detail)


def malformed(detail: str) -> Problem:
    return Problem(400, "malformed-document", detail)


def invalid_query(detail: str) -> Problem:
    return Problem(400, "invalid-query", detail)


def too_large(limit: int) -> Problem:
    return Problem(413, "too-large", f"the body is larger than {limit} bytes")


def unsupported_media_type(content_type: str) -> Problem:
    return Problem(
        415,
        "unsupported-media-type",
        f"{content_type!r} is not accepted; send application/json or application/yaml",
    )


def revision_from_the_future(since: int, current: int) -> Problem:
    return Problem(
        409,
        "revision-from-the-future",
        f"revision {since} is newer than the registry's {current}; resync without 'since'",
        revision=current,
    )
