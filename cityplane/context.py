"""Where the CLI finds its registry: a kubeconfig-like file of named contexts.

``~/.cityplane/config`` (or ``$CITYPLANE_CONFIG``), YAML, mode 0600 because it may hold a
token::

    current: local
    contexts:
      local:
        registry: http://127.0.0.1:8090
        tokenFile: /home/me/.cityplane/registry/admin-token

A command finds its registry and token in this order: ``--registry``/``--token``/``--token-file``,
then the context (``--context NAME`` or ``current``), then ``CITYPLANE_REGISTRY_URL`` and
``CITYPLANE_REGISTRY_TOKEN``. A context's token is only sent to that context's registry.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

CONFIG_ENV = "CITYPLANE_CONFIG"
URL_ENV = "CITYPLANE_REGISTRY_URL"
TOKEN_ENV = "CITYPLANE_REGISTRY_TOKEN"
DEFAULT_CONTEXT = "default"


class ContextError(ValueError):
    """A context file, registry URL or token that cannot be used; one line for the user."""


class ContextEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    registry: str
    token: str | None = None
    tokenFile: str | None = None

    @model_validator(mode="after")
    def _one_token_source(self) -> ContextEntry:
        if self.token is not None and self.tokenFile is not None:
            raise ValueError("give 'token' or 'tokenFile', not both")
        return self


class ContextFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    current: str | None = None
    contexts: dict[str, ContextEntry] = {}


@dataclass(frozen=True, slots=True)
class Connection:
    """A registry to talk to and the token to present (None: no credential found)."""

    registry: str
    token: str | None


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    explicit = env.get(CONFIG_ENV)
    return Path(explicit) if explicit else Path.home() / ".cityplane" / "config"


def check_registry_url(url: str) -> str:
    """An http(s) base URL with a host, without the trailing slash."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ContextError(f"registry URL {url!r} is not an http(s) URL with a host")
    if parts.query or parts.fragment:
        raise ContextError(f"registry URL {url!r} takes no query or fragment")
    return url.rstrip("/")


def load_config(path: Path) -> ContextFile:
    """The context file, or an empty one when it does not exist yet."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ContextFile()
    except OSError as exc:
        raise ContextError(f"{path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ContextError(f"{at}: malformed YAML: {getattr(exc, 'problem', exc)}") from None
    try:
        return ContextFile.model_validate(data or {})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in first["loc"]) or "(file)"
        raise ContextError(f"{path}: {field}: {first['msg']}") from None


def save_config(config: ContextFile, path: Path) -> None:
    """Write atomically; the file is 0600 from its first byte (it may hold a token)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    text = yaml.safe_dump(config.model_dump(exclude_none=True), sort_keys=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")  # mkstemp: 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_context(
    name: str,
    registry_url: str,
    token_file: str | os.PathLike[str] | None,
    *,
    token: str | None = None,
    make_current: bool = True,
    path: Path | None = None,
) -> Path:
    """Create or update context ``name`` (and make it current); returns the file written.

    ``cityplane up`` calls this with the bootstrap admin token's file; ``cityplane login``
    with what the user gave. A token file is stored as an absolute path.
    """
    path = path or config_path()
    if not name:
        raise ContextError("a context needs a name")
    if (token is None) == (token_file is None):
        raise ContextError("give a token file or a token (exactly one)")
    config = load_config(path)
    config.contexts[name] = ContextEntry(
        registry=check_registry_url(registry_url),
        token=token,
        tokenFile=str(Path(token_file).expanduser().resolve()) if token_file else None,
    )
    if make_current:
        config.current = name
    save_config(config, path)
    return path


def read_token_file(path: Path) -> str:
    try:
        token = path.expanduser().read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ContextError(f"token file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ContextError(f"token file {path}: not UTF-8 text") from None
    if not token or any(c.isspace() for c in token):
        raise ContextError(f"token file {path}: expected one token on one line")
    return token


def _entry_token(entry: ContextEntry, config_dir: Path) -> str | None:
    if entry.token is not None:
        return entry.token
    if entry.tokenFile is not None:
        # Relative paths are relative to the context file, as in a kubeconfig.
        return read_token_file(config_dir / Path(entry.tokenFile).expanduser())
    return None


def resolve_connection(
    *,
    registry: str | None = None,
    token: str | None = None,
    token_file: Path | None = None,
    context: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Connection:
    """Flags, then the context file, then the environment (see the module docstring)."""
    env = os.environ if env is None else env
    path = config_path(env)
    config = load_config(path)
    name = context or config.current
    entry: ContextEntry | None = None
    if name is not None:
        entry = config.contexts.get(name)
        if entry is None and (context is not None or config.contexts):
            raise ContextError(f"{path}: no context named {name!r}")

    url = registry or (entry.registry if entry else None) or env.get(URL_ENV)
    if not url:
        raise ContextError(
            f"no registry: give --registry URL, run 'cityplane login', or set {URL_ENV}"
        )
    url = check_registry_url(url)

    if token is not None:
        found: str | None = token
    elif token_file is not None:
        found = read_token_file(token_file)
    elif entry is not None and check_registry_url(entry.registry) == url:
        found = _entry_token(entry, path.parent) or env.get(TOKEN_ENV)
    else:
        found = env.get(TOKEN_ENV)
    return Connection(url, found or None)


def login(args: argparse.Namespace) -> int:
    """``cityplane login``: remember a registry and its credential as the current context."""
    from cityplane.cli import EXIT_CONFIG, EXIT_USAGE
    from cityplane.commands import CommandError

    if (args.token is None) == (args.token_file is None):
        raise CommandError("login: give --token-file PATH (or --token)", EXIT_USAGE)
    try:
        url = check_registry_url(args.registry)
        if args.token_file is not None:
            read_token_file(args.token_file)  # fail now, not at the first command
        existed = args.context in load_config(config_path()).contexts
        path = write_context(args.context, url, args.token_file, token=args.token)
    except ContextError as exc:
        raise CommandError(str(exc), EXIT_CONFIG) from None
    except OSError as exc:
        raise CommandError(
            f"cannot write the context file: {exc.strerror or exc}", EXIT_CONFIG
        ) from None
    where = f"token file {Path(args.token_file).resolve()}" if args.token_file else "token"
    print(
        f"context/{args.context} {'updated' if existed else 'created'}: {url} ({where}), "
        f"current, in {path}"
    )
    return 0
