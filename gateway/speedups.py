"""Compiled gateway modules: built by `python -m gateway.speedups build`, never run when stale.

The request path's hot modules compile unchanged with Cython (ADR 15), as aiohttp, yarl and
uvloop ship theirs: compiled modules first, the same code in Python as the fallback, an
environment variable (CITYPLANE_NO_EXTENSIONS=1, after AIOHTTP_NO_EXTENSIONS) to turn them off.
The build goes to gateway/_compiled/<ABI tag>/, never next to the sources, with a manifest of
the sources' sha256. The packages' __init__ call activate(): only when every source matches the
manifest does the compiled directory go first on the package's __path__. The compiled modules
import each other, so one changed source means none of them is used, and stderr says so once.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.machinery
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, MutableSequence, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

MODULES = (
    "gateway.h1server",
    "gateway.server",
    "gateway.outbox",
    "gateway.forwarding",
    "gateway.routing",
    "gateway.exchange",
    "gateway.tracing",
    "gateway.metrics",
    "gateway.accesslog",
    "gateway.upstream.http1",
    "gateway.upstream.client",
    "gateway.upstream.cluster",
    "gateway.upstream.balancer",
    "gateway.upstream.breaker",
    "gateway.policies.ratelimit",
    "gateway.policies.ratelimit_store",
    "gateway.policies.auth",
    "gateway.policies.ratelimit_redis",
    "gateway.paths",
    "gateway.jwks",
    "gateway.heap",
    "gateway.connections",
    "gateway.upstream.target",
    "gateway.upstream.health",
)
# The directives the gain was measured with: the sources compile as they are, and annotations
# stay hints (typed as C they would turn a wrong type at runtime into a TypeError).
DIRECTIVES: dict[str, Any] = {"language_level": 3, "annotation_typing": False, "binding": True}
# Version of `cdef_declarations`' output: a change rebuilds every module.
DECLARATIONS = 1
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]  # this interpreter's ABI
TAG = SUFFIX.split(".")[1]  # ".cpython-311-x86_64-linux-gnu.so" -> "cpython-311-x86_64-linux-gnu"
DISABLE = "CITYPLANE_NO_EXTENSIONS"
REBUILD = "make build"

# `python -m gateway.speedups` imports the gateway package first, which imports this module to
# activate; runpy then warns that the module it is about to run was imported already. The
# second copy only builds, so that warning has nothing to say.
warnings.filterwarnings("ignore", r"'gateway\.speedups' found in sys\.modules", RuntimeWarning)


def _disabled() -> bool:
    return os.environ.get(DISABLE, "") not in ("", "0")


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


@dataclass(frozen=True)
class Verdict:
    compiled: bool
    detail: str  # "Cython 3.x" when compiled, else why the sources run ("" when not built)


class CompiledTree:
    """The compiled copies of `modules` (all under one top package found in `base`)."""

    def __init__(self, base: Path, modules: Sequence[str], tag: str = TAG) -> None:
        self.base = base
        self.modules = tuple(modules)
        self.root = base / self.modules[0].partition(".")[0] / "_compiled" / tag
        self.manifest_path = self.root / "manifest.json"

    def source(self, module: str) -> Path:
        return self.base.joinpath(*module.split(".")).with_suffix(".py")

    def binary(self, module: str) -> Path:
        *package, name = module.split(".")
        return self.root.joinpath(*package, name + SUFFIX)

    def manifest(self) -> dict[str, Any] | None:
        """The manifest as built; None when there is none; {} when it cannot be read."""
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or not isinstance(data.get("modules"), dict):
            return {}
        return data

    def out_of_date(self, manifest: dict[str, Any] | None) -> list[str]:
        """The modules whose compiled copy is missing or was built from other source bytes."""
        built = (manifest or {}).get("modules") or {}
        return [
            m
            for m in self.modules
            if built.get(m) != _sha256(self.source(m)) or not self.binary(m).is_file()
        ]

    @cached_property
    def verdict(self) -> Verdict:
        """Judged once per process: sources are read and hashed at the first import only."""
        if _disabled():
            return Verdict(False, f"{DISABLE}=1")
        manifest = self.manifest()
        if manifest is None:
            return Verdict(False, "")
        stale = self.out_of_date(manifest)
        if not manifest:
            reason = f"{self.manifest_path.name} unreadable"
        elif stale:
            first = self.source(stale[0]).relative_to(self.base).as_posix()
            what = f"{first} changed" if self.binary(stale[0]).is_file() else f"{first} not built"
            reason = what + (f", and {len(stale) - 1} more" if len(stale) > 1 else "")
        elif set(manifest["modules"]) != set(self.modules):
            reason = "the list of compiled modules changed"
        else:
            return Verdict(True, f"Cython {manifest.get('cython', '?')}")
        # The build imports the package too; telling it to rebuild itself would only confuse.
        if "gateway.speedups" not in sys.orig_argv[:4]:
            print(
                f"cityplane: compiled gateway modules are out of date ({reason}); "
                f"running the Python sources; rebuild with: {REBUILD}",
                file=sys.stderr,
            )
        return Verdict(False, f"out of date: {reason}")

    def activate(self, package: str, path: MutableSequence[str]) -> None:
        """Put `package`'s compiled directory first on its __path__ when all modules are fresh."""
        compiled = str(self.root.joinpath(*package.split(".")))
        if self.verdict.compiled and compiled not in path:
            path.insert(0, compiled)

    def build(self, jobs: int) -> str:
        """Compile what is out of date (all of it after a Cython or directive change)."""
        try:
            from Cython.Shadow import __version__ as cython
            from setuptools import Distribution, Extension
            from setuptools.command.build_ext import build_ext
            from setuptools.errors import BaseError, CCompilerError, CompileError, LinkError
        except ImportError as exc:
            raise BuildError(f"{exc.name} is not installed (pip install '.[speedups]')") from None
        manifest = self.manifest() or {}
        same = (
            manifest.get("cython") == cython
            and manifest.get("directives") == DIRECTIVES
            and manifest.get("declarations") == DECLARATIONS
        )
        todo = self.out_of_date(manifest if same else None)
        if not todo and set(manifest.get("modules") or {}) == set(self.modules):
            return f"gateway modules: compiled with Cython {cython}, up to date with the sources"
        missing = [m for m in todo if not self.source(m).is_file()]
        if missing:
            raise BuildError(f"{self.source(missing[0])} does not exist (gateway.speedups.MODULES)")
        hashes = {m: _sha256(self.source(m)) for m in self.modules}
        started = time.monotonic()
        # Cython's C leaves a few helpers unused; gcc and clang would warn about each.
        quiet_cc = ["-Wno-unused-function"] if os.name == "posix" else []
        with tempfile.TemporaryDirectory(prefix="cityplane-speedups-") as tmp:
            self._declare(Path(tmp, "pxd"), todo)
            sources = [
                Extension(m, [str(self.source(m))], extra_compile_args=quiet_cc) for m in todo
            ]
            # One module per worker process, not cythonize(nthreads=…): its workers print a
            # traceback for every module Cython rejects, after Cython's own error message.
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                generated = list(pool.map(_cythonize, sources, [tmp] * len(sources)))
            failed = [m for m, ext in zip(todo, generated, strict=True) if ext is None]
            if failed:
                raise BuildError(f"Cython rejected {', '.join(failed)} (its error is above)")
            cythonized = time.monotonic()
            dist = Distribution({"name": "cityplane-speedups", "ext_modules": generated})
            command = build_ext(dist)
            command.build_lib, command.build_temp = f"{tmp}/lib", f"{tmp}/temp"
            command.parallel = jobs
            try:
                command.ensure_finalized()
                command.run()
            except (BaseError, CCompilerError, CompileError, LinkError, OSError) as exc:
                raise BuildError(f"the C compiler failed: {exc}") from None
            self.manifest_path.unlink(missing_ok=True)  # nothing loads a half-replaced tree
            for module in todo:
                self.binary(module).parent.mkdir(parents=True, exist_ok=True)
                # A new inode: a process that has the old file mapped keeps running on it.
                os.replace(command.get_ext_fullpath(module), self.binary(module))
        self._prune()
        changed = [m for m in self.modules if _sha256(self.source(m)) != hashes[m]]
        if changed:
            raise BuildError(f"{self.source(changed[0])} changed during the build; build again")
        record = {
            "cython": cython,
            "directives": DIRECTIVES,
            "declarations": DECLARATIONS,
            "modules": hashes,
        }
        partial = self.manifest_path.with_suffix(".tmp")
        partial.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.replace(partial, self.manifest_path)
        done = time.monotonic()
        return (
            f"gateway modules: compiled {len(todo)} of {len(self.modules)} with Cython {cython}"
            f" in {done - started:.1f} s (Cython {cythonized - started:.1f} s, C"
            f" {done - cythonized:.1f} s, {jobs} jobs) into {self.root}"
        )

    def _declare(self, root: Path, modules: Sequence[str]) -> None:
        """The augmenting ``.pxd`` of each module (`cdef_declarations`), where Cython looks for
        them: on the include path, under the module's package (each with an ``__init__.pxd``).
        They are derived from the sources alone, so the sources' hashes cover them too."""
        for module in modules:
            declarations = cdef_declarations(self.source(module).read_text(encoding="utf-8"))
            *package, name = module.split(".")
            folder = root.joinpath(*package)
            folder.mkdir(parents=True, exist_ok=True)
            for depth in range(1, len(package) + 1):
                root.joinpath(*package[:depth], "__init__.pxd").touch()
            if declarations:
                (folder / f"{name}.pxd").write_text(declarations, encoding="utf-8")

    def _prune(self) -> None:
        """Remove compiled files of modules no longer listed: they would still be imported."""
        keep = {self.binary(m) for m in self.modules}
        for path in self.root.rglob("*"):
            if path.is_file() and path.suffix in (".so", ".pyd") and path not in keep:
                path.unlink()


def cdef_declarations(source: str) -> str:
    """An augmenting ``.pxd`` that makes the module's plain slotted classes extension types.

    A class whose body sets ``__slots__`` to a tuple of names, with no decorator, no metaclass
    and no base other than such a class of the same module, keeps its Python source and
    behaviour: its instances already had exactly those attributes. Compiled as a ``cdef``
    class, ``self.name`` in its methods reads and writes a C struct field instead of going
    through CPython's generic attribute lookup (ADR 16). Every slot stays ``public``, so any
    other code reads and writes it as before. Differences: a slot never assigned reads as
    ``None`` rather than raising ``AttributeError``, and the class itself is immutable (a
    test patches a method of an instance's class through a subclass, not by assignment).
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""  # Cython reports it, with its file and line
    declared: set[str] = set()
    out: list[str] = []
    for node in tree.body:
        if not isinstance(node, ast.ClassDef) or node.decorator_list or node.keywords:
            continue
        bases = [b.id if isinstance(b, ast.Name) else None for b in node.bases]
        if any(b is None or (b != "object" and b not in declared) for b in bases):
            continue
        slots = _slots(node)
        if slots is None:
            continue
        declared.add(node.name)
        base = next((b for b in bases if b != "object"), None)
        out.append(f"cdef class {node.name}({base}):" if base else f"cdef class {node.name}:")
        fields = [n for n in slots if n not in ("__weakref__", "__dict__")]
        if "__weakref__" in slots:
            out.append("    cdef object __weakref__")
        if "__dict__" in slots:
            out.append("    cdef dict __dict__")
        if fields:
            out.append(f"    cdef public object {', '.join(fields)}")
        elif "__weakref__" not in slots and "__dict__" not in slots:
            out.append("    pass")
        out.append("")
    return "\n".join(out)


def _slots(node: ast.ClassDef) -> list[str] | None:
    """The names of a class body's ``__slots__ = (...)``; None if it has none or not literal."""
    for statement in node.body:
        if (
            isinstance(statement, ast.Assign)
            and len(statement.targets) == 1
            and isinstance(statement.targets[0], ast.Name)
            and statement.targets[0].id == "__slots__"
        ):
            value = statement.value
            elements = value.elts if isinstance(value, (ast.Tuple, ast.List)) else [value]
            names = [
                e.value
                for e in elements
                if isinstance(e, ast.Constant) and isinstance(e.value, str)
            ]
            # Not literal names, or a private name (mangled to ``_Class__name``): as it is.
            if len(names) != len(elements) or any(
                n.startswith("__") and not n.endswith("__") for n in names
            ):
                return None
            return names
    return None


def _cythonize(source: Any, tmp: str) -> Any:
    """Python to C for one module, in a worker process: the Extension on C, or None."""
    from Cython.Build import cythonize as untyped
    from Cython.Compiler.Errors import CompileError

    cythonize: Callable[..., list[Any]] = untyped  # Cython ships no stubs for it
    try:
        return cythonize(
            [source],
            compiler_directives=DIRECTIVES,
            build_dir=f"{tmp}/c",
            include_path=[f"{tmp}/pxd"],
            quiet=True,
            force=True,
        )[0]
    except CompileError:
        return None  # Cython printed the error with its file and line


class BuildError(Exception):
    """An expected build failure (no Cython, no compiler, a compile error): one line, exit 1."""


GATEWAY = CompiledTree(Path(__file__).resolve().parent.parent, MODULES)


def activate(package: str, path: MutableSequence[str]) -> None:
    """Called by the gateway packages' __init__ with their own __name__ and __path__."""
    GATEWAY.activate(package, path)


def compiled() -> bool:
    """Whether the gateway runs its compiled modules."""
    return GATEWAY.verdict.compiled


def status() -> str:
    """One phrase for the startup log: compiled (Cython 3.x), or Python sources and why."""
    verdict = GATEWAY.verdict
    if verdict.compiled:
        return f"compiled ({verdict.detail})"
    return f"Python sources ({verdict.detail})" if verdict.detail else "Python sources"


def main(argv: Sequence[str]) -> int:
    if list(argv) != ["build"]:
        print("usage: python -m gateway.speedups build", file=sys.stderr)
        return 2
    if _disabled():
        print(f"gateway modules: not compiled ({DISABLE}=1)")
        return 0
    try:
        print(GATEWAY.build(jobs=min(os.cpu_count() or 1, len(MODULES))), flush=True)
    except BuildError as exc:
        print(f"cityplane: cannot build the compiled gateway modules: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
