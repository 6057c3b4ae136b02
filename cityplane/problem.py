"""Errors as values: RFC 9457 problem details, shared by every HTTP part of CityPlane."""

from __future__ import annotations

import json
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_BASE = "https://cityplane.io/problems/"


class Problem(Exception):
    """An error with an HTTP status that renders as ``application/problem+json``.

    Raise it at the edge where the input is known to be bad; the server turns it into a
    response. ``headers`` carries the protocol headers the answer needs (``Retry-After``,
    ``WWW-Authenticate``, ``RateLimit`` …).
    """

    __slots__ = ("detail", "extensions", "headers", "slug", "status", "title")

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str | None = None,
        *,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        self.status = status
        self.slug = slug
        self.title = title or HTTPStatus(status).phrase
        self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})
        self.extensions = extensions
        super().__init__(detail or self.title)

    @property
    def type(self) -> str:
        return PROBLEM_BASE + self.slug

    def to_dict(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type, "title": self.title, "status": self.status}
        if self.detail:
            body["detail"] = self.detail
        if instance:
            body["instance"] = instance
        body.update(self.extensions)
        return body

    def body(self, instance: str | None = None) -> bytes:
        return json.dumps(self.to_dict(instance), ensure_ascii=False).encode()

    def __repr__(self) -> str:
        return f"Problem({self.status}, {self.slug!r}, {self.detail!r})"
