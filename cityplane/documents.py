"""Reading CityService documents from YAML/JSON files, with errors that point at file:line."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cityplane.schema import CityService

SUFFIXES = (".yaml", ".yml", ".json")
MAX_FILE_BYTES = 8 * 1024 * 1024


class DocumentError(ValueError):
    """A document that cannot be used; the message names the file, line and field."""


@dataclass(frozen=True, slots=True)
class Located:
    service: CityService
    source: str  # "file.yaml:12"


# libyaml's C parser when PyYAML was built with it (Debian's and the wheels are): a 10,000-route
# file loads several times faster. Same safe constructor either way.
_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of silently keeping the last."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def _line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """Follow a pydantic error location through the YAML node tree to a line number."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == part:
                    node = value_node
                    line = key_node.start_mark.line + 1
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return line
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _describe(err: ValidationError, node: yaml.Node | None, where: str) -> str:
    lines = []
    for item in err.errors(include_url=False):
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and "[" in p))
        field = ".".join(str(p) for p in loc) or "(document)"
        line = _line_of(node, loc)
        at = f"{where}:{line}" if line else where
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{at}: {field}: {msg}")
    return "\n".join(lines)


def parse_documents(text: str, where: str = "<input>") -> list[Located]:
    """Parse every CityService in one YAML/JSON text (several documents allowed)."""
    try:
        nodes = list(yaml.compose_all(text, Loader=_UniqueKeyLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{where}:{mark.line + 1}" if mark else where
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DocumentError(f"{at}: malformed YAML: {problem}") from None
    found: list[Located] = []
    for node in nodes:
        if node is None:
            continue
        line = node.start_mark.line + 1
        try:
            loader = _UniqueKeyLoader("")
            data = loader.construct_document(node)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f"{where}:{mark.line + 1}" if mark else f"{where}:{line}"
            raise DocumentError(f"{at}: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(data, dict):
            raise DocumentError(f"{where}:{line}: a document must be a mapping (a CityService)")
        kind = data.get("kind")
        if kind != "CityService":
            raise DocumentError(f"{where}:{line}: kind must be 'CityService', got {kind!r}")
        try:
            service = CityService.model_validate(data)
        except ValidationError as exc:
            raise DocumentError(_describe(exc, node, where)) from None
        found.append(Located(service, f"{where}:{line}"))
    return found


def load_yaml_mapping(path: Path) -> dict[str, Any]:
    """One YAML mapping from a settings file (duplicate keys refused); DocumentError otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise DocumentError(f"{path}: cannot read: {reason}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DocumentError(f"{at}: malformed YAML: {problem}") from None
    if not isinstance(data, dict):
        raise DocumentError(f"{path}: must be a mapping")
    return data


def document_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
    if path.is_file():
        return [path]
    raise DocumentError(f"{path}: no such file or directory")


def load_documents(paths: Iterable[Path]) -> list[CityService]:
    """Load services from files and directories; names must be unique across all of them."""
    located: list[Located] = []
    for root in paths:
        for file in document_files(root):
            try:
                if file.stat().st_size > MAX_FILE_BYTES:
                    raise DocumentError(f"{file}: larger than {MAX_FILE_BYTES} bytes")
                text = file.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise DocumentError(f"{file}: not UTF-8 text") from None
            except OSError as exc:
                raise DocumentError(f"{file}: {exc.strerror}") from None
            located.extend(parse_documents(text, str(file)))
    names: dict[str, str] = {}
    for item in located:
        name = item.service.metadata.name
        if name in names:
            raise DocumentError(
                f"{item.source}: service {name!r} is already defined at {names[name]}"
            )
        names[name] = item.source
    return [item.service for item in located]
