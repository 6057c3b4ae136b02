"""``cityplane import-openapi``: an OpenAPI 3.0/3.1 document becomes a ``CityService``.

The gateway routes by exact path or path prefix and by method; it does not match templates.
So (the names below are OpenAPI 3.1's objects):

- The public prefix is the path of ``servers[0].url`` (Server Object, variables replaced by
  their defaults), unless ``--prefix`` is given. The gateway forwards paths unchanged.
- A path without parameters becomes an exact ``path``; a templated one becomes the
  ``pathPrefix`` of its static part: ``/stops/{id}/arrivals`` -> ``/stops/``.
- Operations that land on the same match and need the same credential form one route with
  their ``methods``. Security Requirements with a bearer scheme (``oauth2``,
  ``openIdConnect``, ``http``/``bearer``) give ``auth: {required: true, scopes: [...]}``; an
  operation that can be called without a bearer token leaves its route open (the upstream
  still checks API keys and basic auth). Groups on one match that share a method cannot be
  separate routes (the gateway would refuse them), so they merge, keeping the weaker
  requirement, with a warning.
- A route is named after its operationId when it has exactly one operation, else after its
  path, sanitized to the schema's route-name pattern and made unique.
"""

from __future__ import annotations

import argparse
import re
import sys
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import ValidationError

from cityplane.documents import MAX_FILE_BYTES
from cityplane.schema import CityService, Match, Target

_METHODS = ("get", "head", "post", "put", "patch", "delete", "options")  # the gateway's order
_NAME_MAX = 63
_BEARER_TYPES = ("oauth2", "openIdConnect")


class OpenApiError(ValueError):
    """A document that cannot be imported; the message says where and why, in one line."""


@dataclass(frozen=True, slots=True)
class Imported:
    service: CityService
    document: dict[str, Any]  # the same service, as compact as it was built (for the YAML)
    warnings: list[str]


@dataclass(frozen=True, slots=True)
class _Operation:
    method: str  # upper case
    path: str  # as written in the document
    operation_id: str | None
    match: tuple[str, str]  # ("path" | "pathPrefix", public path)
    scopes: frozenset[str] | None  # None: callable without a bearer token


@dataclass(slots=True)
class _Group:
    match: tuple[str, str]
    scopes: frozenset[str] | None
    ops: list[_Operation] = field(default_factory=list)

    @property
    def methods(self) -> set[str]:
        return {op.method for op in self.ops}


# --- names -----------------------------------------------------------------------------------


def route_name(text: str) -> str:
    """``getStopArrivals`` -> ``get-stop-arrivals``: lowercase ASCII letters, digits and '-'."""
    # NFKD splits accents off (Ü -> U + ¨) so ASCII keeps the letter; ß has no decomposition.
    text = unicodedata.normalize("NFKD", text.replace("ß", "ss")).encode("ascii", "ignore").decode()
    text = re.sub(r"([a-z0-9])([A-Z])", r"\1-\2", text)
    text = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1-\2", text)
    text = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return text[:_NAME_MAX].rstrip("-")


def unique_names(names: list[str]) -> list[str]:
    """Second and later uses of a name get ``-2``, ``-3`` … (still within 63 characters)."""
    seen: set[str] = set()
    result = []
    for name in names:
        candidate, n = name, 2
        while candidate in seen:
            suffix = f"-{n}"
            candidate = name[: _NAME_MAX - len(suffix)].rstrip("-") + suffix
            n += 1
        seen.add(candidate)
        result.append(candidate)
    return result


def _path_name(path: str) -> str:
    return route_name(path.replace("{", "").replace("}", "")) or "root"


# --- reading the document --------------------------------------------------------------------


def load_spec(text: str, where: str = "<spec>") -> dict[str, Any]:
    """Parse YAML or JSON and check it is an OpenAPI 3.x document with paths."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{where}:{mark.line + 1}" if mark else where
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise OpenApiError(f"{at}: malformed YAML: {problem}") from None
    if not isinstance(data, dict):
        raise OpenApiError(f"{where}: not an OpenAPI document (expected a mapping at the top)")
    if "swagger" in data:
        raise OpenApiError(
            f"{where}: Swagger {data['swagger']} is not supported; convert it to OpenAPI 3 first"
        )
    version = data.get("openapi")
    if not isinstance(version, str) or not version.startswith("3."):
        raise OpenApiError(f"{where}: 'openapi' must be a 3.x version string, got {version!r}")
    paths = data.get("paths")
    if not isinstance(paths, dict) or not paths:
        raise OpenApiError(f"{where}: the document has no 'paths' to route")
    return data


def _resolve(spec: Mapping[str, Any], node: Any, where: str) -> Any:
    """Follow a local ``$ref`` (``#/components/pathItems/...``); external ones are refused."""
    seen: set[str] = set()
    while isinstance(node, dict) and isinstance(ref := node.get("$ref"), str):
        if not ref.startswith("#/") or ref in seen:
            raise OpenApiError(f"{where}: $ref {ref!r}: only local, non-circular refs are read")
        seen.add(ref)
        target: Any = spec
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise OpenApiError(f"{where}: $ref {ref!r} points nowhere")
            target = target[part]
        node = target
    return node


def _clean_prefix(path: str, what: str) -> str:
    path = path.strip()
    if path and not path.startswith("/"):
        path = "/" + path
    path = path.rstrip("/")
    if path:
        try:
            Match(pathPrefix=path)
        except ValidationError as exc:
            raise OpenApiError(f"{what} {path!r}: {exc.errors()[0]['msg']}") from None
    return path


def server_prefix(spec: Mapping[str, Any], where: str = "<spec>") -> str:
    servers = spec.get("servers")
    if not isinstance(servers, list) or not servers or not isinstance(servers[0], dict):
        return ""
    url = str(servers[0].get("url", "/"))
    variables = servers[0].get("variables") or {}
    if isinstance(variables, dict):
        for var, decl in variables.items():
            if isinstance(decl, dict) and "default" in decl:
                url = url.replace("{" + str(var) + "}", str(decl["default"]))
    if "{" in url:
        raise OpenApiError(f"{where}: servers[0].url {url!r} has a variable without a default")
    return _clean_prefix(urlsplit(url).path, f"{where}: servers[0].url path")


def _bearer_schemes(spec: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    """Names of the bearer-token security schemes, and of the others."""
    components = spec.get("components")
    schemes = components.get("securitySchemes") if isinstance(components, dict) else None
    bearer: set[str] = set()
    other: set[str] = set()
    for name, scheme in (schemes or {}).items():
        kind = scheme.get("type") if isinstance(scheme, dict) else None
        is_bearer = kind in _BEARER_TYPES or (
            kind == "http" and str(scheme.get("scheme", "")).lower() == "bearer"
        )
        (bearer if is_bearer else other).add(name)
    return bearer, other


def _scopes(requirements: Any, bearer: set[str], where: str) -> frozenset[str] | None:
    """The scopes every way of calling the operation needs; None if one way needs no bearer.

    A Security Requirement list is a choice (any one item suffices); within an item every
    scheme is needed.
    """
    if requirements is None or requirements == []:
        return None
    if not isinstance(requirements, list):
        raise OpenApiError(f"{where}: 'security' must be a list")
    needed: list[frozenset[str]] = []
    for alternative in requirements:
        if not isinstance(alternative, dict):
            raise OpenApiError(f"{where}: a security requirement must be a mapping")
        used = [name for name in alternative if name in bearer]
        if not used:
            return None
        needed.append(frozenset(str(s) for name in used for s in alternative[name] or []))
    return frozenset.intersection(*needed)


# --- the import ------------------------------------------------------------------------------


def _match(prefix: str, path: str, where: str) -> tuple[str, str]:
    full = prefix + path
    brace = full.find("{")
    match = ("path", full) if brace < 0 else ("pathPrefix", full[: full.rfind("/", 0, brace) + 1])
    try:
        Match.model_validate({match[0]: match[1]})
    except ValidationError as exc:
        msg = exc.errors(include_url=False)[0]["msg"]
        raise OpenApiError(f"{where}: {match[0]} {match[1]!r}: {msg}") from None
    return match


def _operations(
    spec: Mapping[str, Any], prefix: str, where: str, warnings: list[str]
) -> list[_Operation]:
    bearer, other = _bearer_schemes(spec)
    root_security = spec.get("security")
    ops: list[_Operation] = []
    other_secured = False
    for path, raw_item in spec["paths"].items():
        at = f"{where}: paths.{path}"
        if not isinstance(path, str) or not path.startswith("/"):
            raise OpenApiError(f"{at}: a path must start with '/'")
        item = _resolve(spec, raw_item, at)
        if not isinstance(item, dict):
            raise OpenApiError(f"{at}: a path item must be a mapping")
        if "trace" in item:
            warnings.append(f"TRACE {path} skipped: the gateway does not route TRACE")
        for method in _METHODS:
            op = item.get(method)
            if op is None:
                continue
            if not isinstance(op, dict):
                raise OpenApiError(f"{at}.{method}: an operation must be a mapping")
            requirements = op.get("security", root_security)
            scopes = _scopes(requirements, bearer, f"{at}.{method}")
            if scopes is None and requirements:
                other_secured = other_secured or any(
                    name in other for alt in requirements for name in alt
                )
            op_id = op.get("operationId")
            ops.append(
                _Operation(
                    method.upper(),
                    path,
                    str(op_id) if op_id is not None else None,
                    _match(prefix, path, at),
                    scopes,
                )
            )
    if not ops:
        raise OpenApiError(f"{where}: the paths have no operations to route")
    if other_secured:
        warnings.append(
            "operations secured only by API keys or basic auth are routed without gateway "
            "auth; the upstream keeps checking those credentials"
        )
    return ops


def _groups(ops: list[_Operation], warnings: list[str]) -> list[_Group]:
    groups: list[_Group] = []
    for op in ops:
        for group in groups:
            if group.match == op.match and group.scopes == op.scopes:
                group.ops.append(op)
                break
        else:
            groups.append(_Group(op.match, op.scopes, [op]))
    merged = True
    while merged:
        merged = False
        for i, a in enumerate(groups):
            for b in groups[i + 1 :]:
                if a.match == b.match and a.methods & b.methods:
                    weaker = None if a.scopes is None or b.scopes is None else a.scopes & b.scopes
                    warnings.append(
                        f"{a.match[0]} {a.match[1]}: {', '.join(sorted(a.methods & b.methods))} "
                        "operations under it need different credentials; one route keeps "
                        + (
                            "no auth"
                            if weaker is None
                            else f"the scopes they share {sorted(weaker)}"
                        )
                    )
                    a.ops.extend(b.ops)
                    a.scopes = weaker
                    groups.remove(b)
                    merged = True
                    break
            if merged:
                break
    return groups


def _route_names(groups: list[_Group]) -> list[str]:
    per_match: dict[tuple[str, str], int] = {}
    for g in groups:
        per_match[g.match] = per_match.get(g.match, 0) + 1
    names = []
    for g in groups:
        first = g.ops[0]
        if len(g.ops) == 1 and first.operation_id and route_name(first.operation_id):
            names.append(route_name(first.operation_id))
            continue
        name = _path_name(min((op.path for op in g.ops), key=len))
        if per_match[g.match] > 1:
            name += "-" + "-".join(m.lower() for m in _ordered(g.methods))
        names.append(route_name(name))
    return unique_names(names)


def _ordered(methods: set[str]) -> list[str]:
    return [m.upper() for m in _METHODS if m.upper() in methods]


def _version(info: Any) -> str:
    raw = str(info.get("version", "")) if isinstance(info, dict) else ""
    found = re.match(r"^v?(\d+)(?:\.|$)", raw.strip())  # 2.1.0 -> v2; 2026-01-15 -> v1
    return f"v{int(found.group(1))}" if found else "v1"


def import_openapi(
    spec: Mapping[str, Any],
    *,
    name: str,
    upstream: str,
    prefix: str | None = None,
    lifecycle: str | None = None,
    where: str = "<spec>",
) -> Imported:
    """Build and validate the service; ``spec`` is what :func:`load_spec` returned."""
    warnings: list[str] = []
    base = server_prefix(spec, where)
    public = base if prefix is None else _clean_prefix(prefix, "--prefix")
    if prefix is not None and public != base:
        warnings.append(
            f"--prefix {public or '/'}: the gateway forwards paths unchanged, so the upstream "
            f"receives {public or ''}/…, while servers[0] in the document says {base or '/'}"
        )
    groups = _groups(_operations(spec, public, where, warnings), warnings)
    routes = []
    for group, route in zip(groups, _route_names(groups), strict=True):
        entry: dict[str, Any] = {
            "name": route,
            "match": {group.match[0]: group.match[1], "methods": _ordered(group.methods)},
        }
        if group.scopes is not None:
            entry["auth"] = {"required": True, "scopes": sorted(group.scopes)}
        routes.append(entry)

    info = spec.get("info") if isinstance(spec.get("info"), dict) else {}
    annotations = {
        f"cityplane.io/openapi-{key}": str(info[key])
        for key in ("title", "version")
        if isinstance(info, dict) and info.get(key) is not None
    }
    metadata: dict[str, Any] = {"name": name}
    if annotations:
        metadata["annotations"] = annotations
    doc_spec: dict[str, Any] = {"version": _version(info)}
    if lifecycle is not None:
        doc_spec["lifecycle"] = lifecycle
    doc_spec["upstream"] = {"targets": [{"url": upstream}]}
    doc_spec["routes"] = routes
    document = {
        "apiVersion": "cityplane.io/v1alpha1",
        "kind": "CityService",
        "metadata": metadata,
        "spec": doc_spec,
    }
    try:
        service = CityService.model_validate(document)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise OpenApiError(
            f"{where}: the imported service is not valid: {loc}: {first['msg']}"
        ) from None
    return Imported(service, document, warnings)


def service_yaml(imported: Imported, source: str) -> str:
    from cityplane.declarative import document_yaml

    header = f"# Imported from {source} by cityplane import-openapi\n"
    return header + document_yaml(imported.document, compact=True)


# --- the command-line handler ----------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from cityplane.cli import EXIT_CONFIG, EXIT_USAGE
    from cityplane.commands import CommandError
    from cityplane.declarative import check_name
    from cityplane.documents import DocumentError, parse_documents

    try:
        check_name(args.name)
        Target(url=args.upstream)
        if args.prefix is not None and not args.prefix.startswith("/"):
            raise ValueError(f"--prefix {args.prefix!r} must start with '/'")
    except ValidationError as exc:
        raise CommandError(f"--upstream: {exc.errors()[0]['msg']}", EXIT_USAGE) from None
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    source: Path = args.spec
    try:
        if source.stat().st_size > MAX_FILE_BYTES:
            raise CommandError(f"{source}: larger than {MAX_FILE_BYTES} bytes", EXIT_CONFIG)
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise CommandError(f"{source}: {exc.strerror}", EXIT_CONFIG) from None
    except UnicodeDecodeError:
        raise CommandError(f"{source}: not UTF-8 text", EXIT_CONFIG) from None
    try:
        imported = import_openapi(
            load_spec(text, str(source)),
            name=args.name,
            upstream=args.upstream,
            prefix=args.prefix,
            lifecycle=args.lifecycle,
            where=str(source),
        )
        out = service_yaml(imported, source.name)
        parse_documents(out, "<import>")  # what we print is what `apply -f` will read
    except (OpenApiError, DocumentError) as exc:
        raise CommandError(str(exc), EXIT_CONFIG) from None
    for warning in imported.warnings:
        print(f"cityplane: warning: {warning}", file=sys.stderr)
    if args.output is None:
        try:
            sys.stdout.write(out)
            sys.stdout.flush()
        except BrokenPipeError:
            from cityplane.commands import reader_went_away

            return reader_went_away()
        return 0
    try:
        Path(args.output).write_text(out, encoding="utf-8")
    except OSError as exc:
        raise CommandError(f"-o {args.output}: {exc.strerror}", EXIT_CONFIG) from None
    routes = len(imported.service.spec.routes)
    print(f"service/{args.name}: {routes} route{'s' * (routes != 1)} written to {args.output}")
    return 0
