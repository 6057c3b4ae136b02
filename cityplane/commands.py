"""``cityplane apply | delete | get | lifecycle``: fetch, write and print around the pure
decisions of :mod:`cityplane.declarative`.

Every function here talks to one :class:`RegistryClient`; :func:`run` is the handler cli.py
calls with the parsed arguments. A failure the user must see ends as :class:`CommandError`:
one line, an exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from cityplane.cli import EXIT_CONFIG, EXIT_USAGE
from cityplane.client import RegistryClient, RegistryError, RegistryUnavailable
from cityplane.declarative import (
    Output,
    check_name,
    colourise,
    has_labels,
    parse_labels,
    parse_sunset,
    plan,
    render_list,
    render_one,
)
from cityplane.schema import CityService, Lifecycle


class CommandError(Exception):
    """A failed client command: cli.py prints it as one line and exits with ``code``.

    Not ``CliError`` itself: under ``python -m cityplane.cli`` that class exists twice
    (``__main__`` and ``cityplane.cli``), and only cli.py's own copy is caught there.
    """

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class Console:
    out: TextIO
    err: TextIO
    colour: bool = False

    @classmethod
    def standard(cls) -> Console:
        tty = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        return cls(sys.stdout, sys.stderr, tty)

    def line(self, text: str = "") -> None:
        print(text, file=self.out)

    def lines(self, lines: Iterable[str]) -> None:
        for line in colourise(lines) if self.colour else lines:
            print(line, file=self.out)

    def error(self, text: str) -> None:
        print(f"cityplane: {text}", file=self.err)


def _fatal(exc: RegistryError) -> bool:
    """Errors that will fail every other service too: stop instead of repeating them."""
    return exc.status == 401


async def apply_services(
    registry: RegistryClient, services: Sequence[CityService], *, dry_run: bool, console: Console
) -> int:
    failed = 0
    suffix = " (dry run)" if dry_run else ""
    for wanted in services:
        name = wanted.metadata.name
        try:
            current = await registry.get_service(name)
            step = plan(wanted, current)
            write = not dry_run and step.action != "unchanged"
            if write and current is None:
                await registry.create_service(step.desired)
            elif write and current is not None:
                await registry.replace_service(
                    step.desired, resource_version=current.metadata.resourceVersion
                )
        except RegistryError as exc:
            if _fatal(exc):
                raise
            console.error(f"service/{name}: {_explain(exc)}")
            failed += 1
            continue
        console.line(f"service/{name} {step.action}{suffix}")
        console.lines(step.diff)
    return 1 if failed else 0


async def delete_services(
    registry: RegistryClient, names: Sequence[str], *, ignore_not_found: bool, console: Console
) -> int:
    failed = 0
    for name in names:
        try:
            gone = await registry.delete_service(name)
        except RegistryError as exc:
            if _fatal(exc):
                raise
            console.error(f"service/{name}: {_explain(exc)}")
            failed += 1
            continue
        if gone is not None:
            console.line(f"service/{name} deleted")
        elif ignore_not_found:
            console.line(f"service/{name} not found (ignored)")
        else:
            console.error(f"service/{name} not found")
            failed += 1
    return 1 if failed else 0


async def show_services(
    registry: RegistryClient,
    *,
    lifecycle: Lifecycle | None,
    labels: Mapping[str, str],
    output: Output,
    console: Console,
) -> int:
    found = await registry.list_services(lifecycle=lifecycle, labels=labels)
    # Filter here too: the contract documents one `label`; a selector may have several, and
    # this keeps it exact whether or not a registry honours the parameter repeated.
    items = [s for s in found.items if has_labels(s, labels)]
    if not items and output == "table":
        print("No services found.", file=console.err)
        return 0
    console.line(render_list(items, output, found.revision))
    return 0


async def show_service(
    registry: RegistryClient, name: str, *, output: Output, console: Console
) -> int:
    service = await registry.get_service(name)
    if service is None:
        console.error(f"service/{name} not found")
        return 1
    console.line(render_one(service, output))
    return 0


async def change_lifecycle(
    registry: RegistryClient,
    name: str,
    to: Lifecycle,
    *,
    sunset: datetime | None,
    console: Console,
) -> int:
    try:
        service = await registry.transition(name, to, sunset=sunset)
    except RegistryError as exc:
        if exc.status == 404:
            console.error(f"service/{name} not found")
            return 1
        raise
    line = f"service/{name} {service.spec.lifecycle}"
    if service.spec.sunset is not None:
        line += f" (sunset {service.spec.sunset.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ})"
    console.line(line)
    return 0


def _explain(exc: RegistryError) -> str:
    if exc.status == 409:
        return f"conflict: {exc}; it changed since it was read, apply again to see the new diff"
    return str(exc)


# --- the command-line handler (cityplane/cli.py parses, this runs) ---------------------------


def run(args: argparse.Namespace) -> int:
    """Run ``apply``, ``delete``, ``get`` or ``lifecycle``; failures raise CommandError."""
    from cityplane.context import ContextError, resolve_connection
    from cityplane.documents import DocumentError, load_documents

    console = Console.standard()
    command: Callable[[RegistryClient], Awaitable[int]]
    # Everything that can be checked without the registry is checked first.
    try:
        if not args.timeout > 0:
            raise ValueError(f"--timeout {args.timeout:g}: must be more than 0 seconds")
        if args.command == "apply":
            services = load_documents(args.filename)
            command = _bind(apply_services, services, dry_run=args.dry_run, console=console)
        elif args.command == "delete":
            names = _delete_names(args, load_documents)
            command = _bind(
                delete_services, names, ignore_not_found=args.ignore_not_found, console=console
            )
        elif args.command == "get":
            command = _get_command(args, console)
        elif args.command == "lifecycle":
            if args.sunset is not None and args.to != "deprecated":
                raise ValueError("--sunset goes with --to deprecated")
            sunset = parse_sunset(args.sunset) if args.sunset is not None else None
            command = _bind(
                change_lifecycle, check_name(args.name), args.to, sunset=sunset, console=console
            )
        else:
            raise AssertionError(args.command)
    except DocumentError as exc:
        raise CommandError(str(exc), EXIT_CONFIG) from None
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    try:
        conn = resolve_connection(
            registry=args.registry,
            token=args.token,
            token_file=args.token_file,
            context=args.context,
        )
    except ContextError as exc:
        raise CommandError(str(exc), EXIT_CONFIG) from None
    if conn.token is None:
        raise CommandError(
            f"no token for {conn.registry}: give --token-file PATH, run 'cityplane login', "
            "or set CITYPLANE_REGISTRY_TOKEN",
            EXIT_CONFIG,
        )

    async def session() -> int:
        async with RegistryClient(conn.registry, conn.token, timeout=args.timeout) as registry:
            return await command(registry)

    try:
        return asyncio.run(session())
    except BrokenPipeError:
        return reader_went_away()
    except RegistryUnavailable as exc:
        raise CommandError(str(exc), 1) from None
    except RegistryError as exc:
        if exc.status == 401:
            raise CommandError(
                f"the registry at {conn.registry} refused the token ({exc}); "
                "check --token/--token-file or run 'cityplane login'",
                1,
            ) from None
        raise CommandError(f"{_subject(args)}{_explain(exc)}", 1) from None


def reader_went_away() -> int:
    """``cityplane get services | head``: the reader closed the pipe; stop quietly.

    Python flushes stdout again at exit and would print a second error there, so stdout
    is pointed at /dev/null first (the recipe in the docs of the ``signal`` module).
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141  # what a shell reports for a process ended by SIGPIPE (128 + 13)


def _bind(
    func: Callable[..., Awaitable[int]], *args: Any, **kwargs: Any
) -> Callable[[RegistryClient], Awaitable[int]]:
    def call(registry: RegistryClient) -> Awaitable[int]:
        return func(registry, *args, **kwargs)

    return call


def _subject(args: argparse.Namespace) -> str:
    name = getattr(args, "name", None)
    return f"service/{name}: " if isinstance(name, str) else ""


def _delete_names(
    args: argparse.Namespace, load: Callable[[list[Path]], list[CityService]]
) -> list[str]:
    if args.filename and (args.resource or args.names):
        raise ValueError("delete: give -f FILE or 'service NAME', not both")
    if args.filename:
        return [s.metadata.name for s in load(args.filename)]
    if args.resource not in ("service", "services", "svc") or not args.names:
        raise ValueError("delete: give -f FILE|DIR or 'service NAME [NAME …]'")
    return [check_name(n) for n in args.names]


def _get_command(
    args: argparse.Namespace, console: Console
) -> Callable[[RegistryClient], Awaitable[int]]:
    if args.name is not None:
        if args.lifecycle or args.selector:
            raise ValueError("get: --lifecycle and -l filter lists, not one service")
        return _bind(
            show_service, check_name(args.name), output=args.output or "yaml", console=console
        )
    if args.resource == "service":
        raise ValueError("get service: give a NAME (or 'get services' for all)")
    return _bind(
        show_services,
        lifecycle=args.lifecycle,
        labels=parse_labels(args.selector),
        output=args.output or "table",
        console=console,
    )
