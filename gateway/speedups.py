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
import re
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Mapping, MutableSequence, Sequence
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
    "gateway.upstream.heads",
    "gateway.ascii",
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
# The directives the gain was measured with. Annotations are types only where `typed_source`
# leaves them, the gateway's extension classes (ADR 17); `nonecheck` makes None in a typed
# variable an AttributeError, as in the sources, instead of a read of None's memory.
DIRECTIVES: dict[str, Any] = {
    "language_level": 3,
    "annotation_typing": True,
    "binding": True,
    "nonecheck": True,
}
# Version of what `cdef_declarations` and `typed_source` write: a change rebuilds every module.
DECLARATIONS = 8
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]  # this interpreter's ABI
TAG = SUFFIX.split(".")[1]  # ".cpython-311-x86_64-linux-gnu.so" -> "cpython-311-x86_64-linux-gnu"
DISABLE = "CITYPLANE_NO_EXTENSIONS"
DEBUG_INFO = "CITYPLANE_DEBUG_INFO"  # set to 1: the build keeps the C debug information (-g)
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
        compiler = compiler_settings()
        classes = self._classes()
        declarations = self.declarations(classes)
        # A module's C reads the struct layout of every extension type it touches, possibly
        # through another module's typed slot: a change to any declaration rebuilds them all.
        interfaces = interfaces_key(declarations)
        same = (
            manifest.get("cython") == cython
            and manifest.get("directives") == DIRECTIVES
            and manifest.get("declarations") == DECLARATIONS
            and manifest.get("interfaces") == interfaces
            and manifest.get("compiler") == compiler
        )
        todo = self.out_of_date(manifest if same else None)
        if not todo and set(manifest.get("modules") or {}) == set(self.modules):
            return f"gateway modules: compiled with Cython {cython}, up to date with the sources"
        missing = [m for m in todo if not self.source(m).is_file()]
        if missing:
            raise BuildError(f"{self.source(missing[0])} does not exist (gateway.speedups.MODULES)")
        hashes = {m: _sha256(self.source(m)) for m in self.modules}
        started = time.monotonic()
        quiet_cc = list(compiler["args"])
        with tempfile.TemporaryDirectory(prefix="cityplane-speedups-") as tmp:
            self._declare(Path(tmp, "pxd"), declarations)
            sources = [
                Extension(
                    m,
                    [str(self._typed(Path(tmp, "src"), m, classes[m]))],
                    extra_compile_args=quiet_cc,
                )
                for m in todo
            ]
            # One module per worker process, not cythonize(nthreads=…): its workers print a
            # traceback for every module Cython rejects, after Cython's own error message.
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                generated = list(
                    pool.map(_cythonize, sources, [tmp] * len(sources), map(self.source, todo))
                )
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
            "interfaces": interfaces,
            "compiler": compiler,
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

    def declarations(
        self, classes: Mapping[str, Mapping[str, Sequence[str]]] | None = None
    ) -> dict[str, str]:
        """Each module's augmenting ``.pxd`` (`cdef_declarations`), derived from the sources
        alone: the sources' hashes cover them, so the runtime check needs no more."""
        classes = self._classes() if classes is None else classes
        functions = self._functions()
        found = {}
        for m in self.modules:
            try:
                found[m] = cdef_declarations(self._text(m), m, classes[m], functions[m])
            except ValueError as exc:  # a C_TYPES literal the build refuses (ADR 22)
                raise BuildError(f"{self.source(m)}: {exc}") from None
        return found

    def _classes(self) -> dict[str, dict[str, list[str]]]:
        """For each module, the extension classes (`extension_classes`) of the modules whose
        classes it may type and cimport: its own, and those of `_cimportable` modules."""
        found = {m: extension_classes(self._text(m)) for m in self.modules}
        cimportable = self._cimportable()
        return {
            m: {o: c for o, c in found.items() if o == m or o in cimportable[m]}
            for m in self.modules
        }

    def _functions(self) -> dict[str, dict[str, list[str]]]:
        """For each module, the ``cpdef`` functions of the `_cimportable` modules (ADR 19)."""
        names = {m: cpdef_function_names(self._text(m)) for m in self.modules}
        cimportable = self._cimportable()
        return {m: {o: names[o] for o in cimportable[m] if names[o]} for m in self.modules}

    def _cimportable(self) -> dict[str, set[str]]:
        """For each module, the other modules it may cimport from: those that do not import it
        back, directly or through others (`imported_modules`). A cimported class or function's
        module is imported when the importer's module starts, before its body runs, so a cycle
        would meet a module whose names do not exist yet: ``import gateway.h1server`` failed
        with ImportError while it cimported ``gateway.connections``'s class, which imports it."""
        graph = {m: imported_modules(self._text(m), m, self.modules) for m in self.modules}
        reaches: dict[str, set[str]] = {}
        for start in self.modules:
            seen: set[str] = set()
            todo = [start]
            while todo:
                for nxt in graph[todo.pop()]:
                    if nxt not in seen:
                        seen.add(nxt)
                        todo.append(nxt)
            reaches[start] = seen
        return {
            m: {o for o in self.modules if o != m and m not in reaches[o]} for m in self.modules
        }

    def _text(self, module: str) -> str:
        path = self.source(module)
        return path.read_text(encoding="utf-8") if path.is_file() else ""  # build() reports it

    def _typed(self, root: Path, module: str, others: Mapping[str, Sequence[str]]) -> Path:
        """The file Cython compiles for ``module``: its source when `typed_source` leaves it
        as it is, else the typed text under ``root`` at the module's relative path (Cython
        then names ``gateway/…/module.py`` in tracebacks, with the source's line numbers)."""
        source = self.source(module)
        text = source.read_text(encoding="utf-8")
        try:
            typed = typed_source(text, module, others)
        except ValueError as exc:
            raise BuildError(f"{source}: {exc}") from None
        if typed == text:
            return source
        *package, name = module.split(".")
        path = root.joinpath(*package, name + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        for depth in range(1, len(package) + 1):
            root.joinpath(*package[:depth], "__init__.py").touch()
        path.write_text(typed, encoding="utf-8")
        return path

    def _declare(self, root: Path, declarations: Mapping[str, str]) -> None:
        """Write the ``.pxd`` files where Cython looks for them: on the include path, under
        the module's package (each with an ``__init__.pxd``), all of them, since a module
        cimports the extension types of others."""
        for module, text in declarations.items():
            *package, name = module.split(".")
            folder = root.joinpath(*package)
            folder.mkdir(parents=True, exist_ok=True)
            for depth in range(1, len(package) + 1):
                root.joinpath(*package[:depth], "__init__.pxd").touch()
            if text:
                (folder / f"{name}.pxd").write_text(text, encoding="utf-8")

    def _prune(self) -> None:
        """Remove compiled files of modules no longer listed: they would still be imported."""
        keep = {self.binary(m) for m in self.modules}
        for path in self.root.rglob("*"):
            if path.is_file() and path.suffix in (".so", ".pyd") and path not in keep:
                path.unlink()


def compiler_settings() -> dict[str, Any]:
    """What the C compiler is told, as the manifest records it: a change rebuilds every module
    (a build with debug information, another CC or CFLAGS is another binary)."""
    # Cython's C leaves a few helpers unused; gcc and clang would warn about each. No debug
    # information unless CITYPLANE_DEBUG_INFO=1 (Python's CFLAGS have -g): 6 MB of modules
    # instead of 37 MB and a build ~25 % shorter; symbols stay, so profilers (callgrind,
    # perf) still name the C functions, only without their files and lines.
    args = ["-Wno-unused-function"] if os.name == "posix" else []
    if os.name == "posix" and os.environ.get(DEBUG_INFO, "") in ("", "0"):
        args.append("-g0")
    return {
        "args": args,
        "CC": os.environ.get("CC", ""),
        "CFLAGS": os.environ.get("CFLAGS", ""),
    }


def interfaces_key(declarations: Mapping[str, str]) -> str:
    """One hash of every module's declarations, as the manifest records it."""
    return hashlib.sha256(json.dumps(dict(declarations), sort_keys=True).encode()).hexdigest()


def extension_classes(source: str) -> list[str]:
    """The classes of a module that `cdef_declarations` makes extension types, in order."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    return [node.name for node, _base, _slots in _eligible(tree)]


def cpdef_function_names(source: str) -> list[str]:
    """The module-level functions of a module that `cdef_declarations` declares ``cpdef``."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    return [name for name, _params in _cpdef_functions(tree)]


def imported_modules(source: str, module: str, modules: Collection[str]) -> set[str]:
    """The modules among ``modules`` that a module imports when it is imported: its
    statements outside function bodies and ``if TYPE_CHECKING:`` blocks."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    found: set[str] = set()
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue  # runs when called, not when the module is imported
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        todo.extend(ast.iter_child_nodes(node))
    return {m for m in found if m in modules and m != module}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def cdef_declarations(
    source: str,
    module: str = "",
    others: Mapping[str, Sequence[str]] | None = None,
    functions: Mapping[str, Collection[str]] | None = None,
) -> str:
    """An augmenting ``.pxd`` that makes the module's plain slotted classes extension types.

    A class whose body sets ``__slots__`` to a tuple of names, with no decorator, no metaclass
    and no base other than such a class of the same module, keeps its Python source and
    behaviour: its instances already had exactly those attributes. Compiled as a ``cdef``
    class, ``self.name`` in its methods reads and writes a C struct field instead of going
    through CPython's generic attribute lookup (ADR 16). Every slot stays ``public``, so any
    other code reads and writes it as before. Differences: a slot never assigned reads as
    ``None`` rather than raising ``AttributeError``, and the class itself is immutable (a
    test patches a method of an instance's class through a subclass, not by assignment).

    A slot that ``__init__`` sets from a parameter annotated with such a class (of this module,
    or of a module in ``others``: module name to its extension classes), or annotates with one
    itself, optionally ``| None``, is declared with that type: ``self.ex.request_id`` then
    reads two struct fields. Assigning an object of another type to it raises ``TypeError``
    in the compiled form (mypy holds the sources to the same annotations).
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""  # Cython reports it, with its file and line
    classes = _eligible(tree)
    local = {node.name for node, _base, _slots in classes}
    imported = _imported_classes(tree, module, others or {})
    cimports: set[tuple[str, str, str]] = set()
    # A method a base or a subclass here defines too stays ``def``: an override of a ``cpdef``
    # method is ``cpdef`` itself and must repeat its C signature (and Cython refuses one that
    # holds a closure).
    related = {base for _node, base, _slots in classes if base}
    related |= {node.name for node, base, _slots in classes if base}
    seen: set[str] = set()
    shared: set[str] = set()
    for node, _base, _slots in classes:
        if node.name in related:
            names = {
                f.name for f in node.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            }
            shared |= seen & names
            seen |= names
    out: list[str] = []
    defined: set[str] = set()
    forward: list[str] = []
    for node, base, slots in classes:
        defined.add(node.name)
        out.append(f"cdef class {node.name}({base}):" if base else f"cdef class {node.name}:")
        fields = [n for n in slots if n not in ("__weakref__", "__dict__")]
        if "__weakref__" in slots:
            out.append("    cdef object __weakref__")
        if "__dict__" in slots:
            out.append("    cdef dict __dict__")
        types = _slot_types(node, set(fields))
        untyped = []
        for field in fields:
            name = types.get(field)
            if name in local:
                if name not in defined and name not in forward:
                    forward.append(name)  # a class further down the module
                out.append(f"    cdef public {name} {field}")
            elif name is not None and name in imported:
                cimports.add(imported[name])
                out.append(f"    cdef public {name} {field}")
            else:
                untyped.append(field)
        if untyped:
            out.append(f"    cdef public object {', '.join(untyped)}")
        methods = [m for m in _cpdef_methods(node, local | set(imported)) if m[0] not in shared]
        for name, params in methods:
            for param in params:
                kind = param.split(" ")[0] if " " in param else None
                if kind in local and kind not in defined and kind not in forward:
                    forward.append(kind)
                elif kind in imported:
                    cimports.add(imported[kind])
            out.append(f"    cpdef {name}({', '.join(params)})")
        if not (fields or methods) and "__weakref__" not in slots and "__dict__" not in slots:
            out.append("    pass")
        out.append("")
    bound = _bound_counts(tree)
    function_cimports = []
    for statement in tree.body:  # top-level imports only: those run when the module starts
        if not (
            isinstance(statement, ast.ImportFrom) and statement.module and statement.level == 0
        ):
            continue
        for alias in statement.names:
            # Not under another name: Cython then drops the Python-level binding of it.
            exported = (functions or {}).get(statement.module, ())
            if alias.name in exported and alias.asname is None and bound[alias.name] == 1:
                function_cimports.append((statement.module, alias.name, alias.name))
    functions_here = _cpdef_functions(tree, local | set(imported))
    typed = c_types(tree)
    for name, params in functions_here:
        for param in params:
            kind = param.split(" ")[0] if " " in param else None
            if kind in imported:
                cimports.add(imported[kind])
        declared = typed.get(name)
        if declared:  # ADR 22: C types for parameters in the signature, for locals in a decorator
            bare = [p.split(" ")[-1].removesuffix("=*") for p in params]
            params = [
                f"{C_TYPE_SPELLINGS[declared[b]][0]} {b}{'=*' if p.endswith('=*') else ''}"
                if b in declared
                else p
                for p, b in zip(params, bare, strict=True)
            ]
            local_types = [
                f"{n}={C_TYPE_SPELLINGS[t][1]}"
                for n, t in sorted(declared.items())
                if n not in bare
            ]
            if local_types:
                out.append(f"@cython.locals({', '.join(local_types)})")
        out.append(f"cpdef {name}({', '.join(params)})")
    if functions_here:
        out.append("")
    if not out and not function_cimports:
        return ""
    head = [
        f"from {m} cimport {c}" if c == alias else f"from {m} cimport {c} as {alias}"
        for m, c, alias in sorted(cimports | set(function_cimports))
    ]
    if any(line.startswith("@cython.") for line in out):
        head.insert(0, "cimport cython")
    head += [f"cdef class {name}" for name in forward]
    return "\n".join([*head, *([""] if head else []), *out])


def typed_source(
    source: str, module: str = "", others: Mapping[str, Sequence[str]] | None = None
) -> str:
    """The text Cython compiles for a module: its source, where every return annotation and
    every annotation of a parameter or local that does not name an extension class is
    ``object``.

    With ``annotation_typing`` Cython turns annotations into runtime types that mypy does not
    mean: ``float`` becomes a C double (an ``int`` argument arrives as ``1.0``), ``bool`` a C
    truth value, and ``str``, ``bytes``, ``list``, ``dict`` and ``tuple`` accept their exact
    type only (no ``StrEnum`` member, no ``bytearray``, no named tuple). An extension class of
    the gateway (``C``, ``C | None``, ``Optional[C]``) stays: the argument is checked once and
    its slots are struct fields from then on (ADR 16). Lines keep their numbers, so tracebacks
    point at the real source.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source  # Cython reports it, with its file and line
    known = {node.name for node, _base, _slots in _eligible(tree)}
    known |= set(_imported_classes(tree, module, others or {}))
    typed = c_types(tree)
    cpdef = {name for name, _params in _cpdef_functions(tree)}
    spans: list[ast.expr] = []
    blanks: list[ast.arg] = []  # ": annotation" of a parameter the .pxd gives a C type
    seen: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        a = node.args
        c_params = typed.get(node.name, {}) if node in tree.body and node.name in cpdef else {}
        for arg in (*a.posonlyargs, *a.args, *a.kwonlyargs):
            if arg.annotation is not None and arg.arg in c_params:
                blanks.append(arg)
            elif arg.annotation is not None and _class_name(arg.annotation) not in known:
                spans.append(arg.annotation)
        for star in (a.vararg, a.kwarg):  # the annotation is the elements' type
            if star is not None and star.annotation is not None:
                spans.append(star.annotation)
        # A return type would only add a check on the way out; on a coroutine Cython 3.3
        # writes C that gcc warns about (a typed pointer stored in a PyObject *).
        if node.returns is not None:
            spans.append(node.returns)
        for inner in ast.walk(node):
            if (
                isinstance(inner, ast.AnnAssign)
                and id(inner) not in seen
                and _class_name(inner.annotation) not in known
            ):
                seen.add(id(inner))
                spans.append(inner.annotation)
    # The bare `*` of a function whose keyword-only parameters the .pxd declares as plain
    # ones (ADR 19): blanked with spaces, so every column and line stays where it was.
    raw = source.encode("utf-8")
    for lo, hi in _keyword_markers(tree, raw):
        raw = raw[:lo] + b" " * (hi - lo) + raw[hi:]
    lines = raw.splitlines(keepends=True)
    edits: list[tuple[int, int, int, int, bytes | None]] = []  # None: "object"
    for ann in spans:
        assert ann.end_lineno is not None and ann.end_col_offset is not None
        edits.append((ann.lineno, ann.col_offset, ann.end_lineno, ann.end_col_offset, None))
    for arg in blanks:
        note = arg.annotation
        assert note is not None and note.end_lineno is not None and note.end_col_offset is not None
        if note.end_lineno != arg.lineno:
            raise ValueError(f"line {arg.lineno}: a C-typed parameter's annotation on one line")
        start = arg.col_offset + len(arg.arg.encode("utf-8"))
        edits.append((arg.lineno, start, arg.lineno, note.end_col_offset, b""))
    for lineno, col, end_lineno, end_col, text in sorted(edits, reverse=True):
        first, last = lineno - 1, end_lineno - 1
        if text is None:
            # ast's columns count UTF-8 bytes; a multi-line annotation leaves continuation lines.
            replacement = b"object" + b" \\\n" * (last - first)
        else:  # blanked: the columns after it stay where they were
            replacement = b" " * (end_col - col)
        lines[first : last + 1] = [lines[first][:col] + replacement + lines[last][end_col:]]
    return b"".join(lines).decode("utf-8")


# Words a .pxd declaration reads as C types or Cython keywords, not as names.
_C_WORDS = frozenset(
    [
        "bint",
        "char",
        "complex",
        "const",
        "cdef",
        "cimport",
        "cpdef",
        "ctypedef",
        "double",
        "enum",
        "extern",
        "float",
        "gil",
        "include",
        "inline",
        "int",
        "long",
        "nogil",
        "object",
        "public",
        "readonly",
        "short",
        "signed",
        "sizeof",
        "size_t",
        "struct",
        "union",
        "unsigned",
        "void",
        "Py_ssize_t",
        "NULL",
    ]
)

# What a module's ``C_TYPES`` may give a parameter or local of a function (ADR 22): the C type
# as a .pxd signature spells it, and as ``@cython.locals`` does.
C_TYPE_SPELLINGS = {
    "Py_ssize_t": ("Py_ssize_t", "Py_ssize_t"),
    "bint": ("bint", "cython.bint"),
    "uchar": ("unsigned char", "cython.uchar"),
    "bytes": ("bytes", "bytes"),
    "tuple": ("tuple", "tuple"),
}


def c_types(tree: ast.Module) -> dict[str, dict[str, str]]:
    """A module's ``C_TYPES``: function name -> {parameter or local: C type}, read from the
    literal the module assigns at its top level (ADR 22). The sources run without them; the
    compiled form declares them, so that ``data[i]`` on a ``bytes`` with a ``Py_ssize_t``
    index is a C read of one byte instead of a Python int. Anything but a literal of names
    in `C_TYPE_SPELLINGS` is an error: the build stops rather than compile other types."""
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if not (isinstance(target, ast.Name) and target.id == "C_TYPES"):
            continue
        value = getattr(node, "value", None)
        try:
            found = ast.literal_eval(value) if value is not None else None
        except ValueError:
            found = None
        if not isinstance(found, dict) or not all(
            isinstance(f, str)
            and isinstance(names, dict)
            and all(isinstance(n, str) and t in C_TYPE_SPELLINGS for n, t in names.items())
            for f, names in found.items()
        ):
            raise ValueError(
                f"line {node.lineno}: C_TYPES must be a literal dict of function name to"
                f" {{name: one of {', '.join(C_TYPE_SPELLINGS)}}}"
            )
        return found
    return {}


_NOT_IN_CPDEF = (
    ast.Yield,
    ast.YieldFrom,
    ast.Await,
    ast.Lambda,
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
    ast.GeneratorExp,
)


def _cpdef_methods(node: ast.ClassDef, known: Collection[str] = ()) -> list[tuple[str, list[str]]]:
    """The plain methods of a class that can be ``cpdef`` (name, parameters for the .pxd).

    A call ``self.m(...)`` (or on a slot typed with the class) to a ``cpdef`` method is a C
    call through the class's vtable instead of an attribute lookup and a Python call; Python
    code still calls it as before, and a Python subclass's override still wins. Left ``def``:
    special methods, decorated ones, generators and coroutines, methods with ``*args``,
    ``**kwargs``, keyword-only or positional-only parameters, and methods holding a closure
    (a nested function, lambda or generator expression), which Cython refuses in ``cpdef``.
    A parameter annotated with a class in ``known`` is declared with it, as ``typed_source``
    keeps that annotation.
    """
    found = []
    for f in node.body:
        if isinstance(f, ast.FunctionDef) and f.args.args:  # a method without self: not ours
            params = _cpdef_params(f, known)
            if params is not None:
                found.append((f.name, params))
    return found


def _cpdef_functions(tree: ast.Module, known: Collection[str] = ()) -> list[tuple[str, list[str]]]:
    """The module-level functions that can be ``cpdef`` (name, parameters for the .pxd).

    A call from the same module to a ``cpdef`` function is a C call instead of a lookup in the
    module's globals and a Python call (ADR 19); other modules still import and call it as a
    Python function. The conditions of `_cpdef_methods` apply, and the name must be bound once
    in the module (by this ``def``, at the top level, never declared ``global``): the module's
    own calls no longer see a later rebinding of the name, so none may exist.
    """
    bound = _bound_counts(tree)
    rebound = {
        name for node in ast.walk(tree) if isinstance(node, ast.Global) for name in node.names
    }
    found = []
    for f in tree.body:
        if not isinstance(f, ast.FunctionDef) or bound.get(f.name) != 1 or f.name in rebound:
            continue
        params = _cpdef_params(f, known)
        if params is not None:
            found.append((f.name, params))
    return found


def _bound_counts(tree: ast.Module) -> Counter[str]:
    """How many times the module's top level binds each name (see `_bound_names`)."""
    return Counter(name for node in tree.body for name in _bound_names(node))


def _bound_names(node: ast.stmt) -> list[str]:
    """The names a module-level statement binds (nested blocks of ``if``/``try`` included)."""
    names = []
    for inner in ast.walk(node):
        if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(inner.name)
        elif isinstance(inner, ast.Name) and isinstance(inner.ctx, (ast.Store, ast.Del)):
            names.append(inner.id)
        elif isinstance(inner, ast.alias):
            names.append((inner.asname or inner.name).split(".")[0])
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        # What the body binds is local to it; only the name itself is the module's.
        return [node.name]
    return names


def _cpdef_params(f: ast.FunctionDef, known: Collection[str]) -> list[str] | None:
    """A function's parameters as a ``cpdef`` declaration, or None if it must stay ``def``.

    Keyword-only parameters are declared after the others, as if the bare ``*`` were not
    there (a ``.pxd`` cannot say keyword-only): `typed_source` removes that ``*`` from what
    Cython compiles (ADR 19). That needs at least one other parameter before the ``*`` and,
    once a parameter has a default, a default for every one after it.
    """
    if f.decorator_list or (f.name.startswith("__") and f.name.endswith("__")):
        return None
    a = f.args
    if a.posonlyargs or a.vararg or a.kwarg or (a.kwonlyargs and not a.args):
        return None
    every = [*a.args, *a.kwonlyargs]
    if f.name in _C_WORDS or any(p.arg in _C_WORDS for p in every):
        return None  # a .pxd would read `cpdef double(...)` as a C type, not a name
    if any(isinstance(n, _NOT_IN_CPDEF) for n in ast.walk(f) if n is not f):
        return None
    defaults = [None] * (len(a.args) - len(a.defaults)) + [*a.defaults, *a.kw_defaults]
    params = []
    after_default = False
    for p, default in zip(every, defaults, strict=True):
        if default is None and after_default:
            return None  # `def f(self, a=1, *, b)`: no positional form of it exists
        after_default = default is not None
        name = _class_name(p.annotation)
        typed = f"{name} {p.arg}" if name in known else p.arg
        params.append(typed + ("=*" if after_default else ""))
    return params


def _keyword_markers(tree: ast.Module, source: bytes) -> list[tuple[int, int]]:
    """(start, end) byte offsets of each bare ``*,`` of a function `_cpdef_params` accepts."""
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    found = []
    for f in ast.walk(tree):
        if not isinstance(f, ast.FunctionDef) or not f.args.kwonlyargs or f.args.vararg:
            continue
        if _cpdef_params(f, ()) is None:
            continue
        a = f.args
        before = a.defaults[-1] if a.defaults else a.args[-1]
        assert before.end_lineno is not None and before.end_col_offset is not None
        lo = starts[before.end_lineno - 1] + before.end_col_offset
        first = a.kwonlyargs[0]
        hi = starts[first.lineno - 1] + first.col_offset
        marker = re.search(rb"\*[ \t]*,", source[lo:hi])
        if marker is not None:  # "*," as written (a comment between them: Cython reports it)
            found.append((lo + marker.start(), lo + marker.end()))
    return found


def _eligible(tree: ast.Module) -> list[tuple[ast.ClassDef, str | None, list[str]]]:
    declared: set[str] = set()
    found = []
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
        found.append((node, next((b for b in bases if b != "object"), None), slots))
    return found


def _imported_classes(
    tree: ast.Module, module: str, others: Mapping[str, Sequence[str]]
) -> dict[str, tuple[str, str, str]]:
    """Local name -> (module, class, local name) for ``from m import C [as L]`` anywhere in the
    module (``if TYPE_CHECKING:`` too) where C is an extension class of another module."""
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == module:
                continue
            for alias in node.names:
                if alias.name in others.get(node.module, ()):
                    local = alias.asname or alias.name
                    found[local] = (node.module, alias.name, local)
    return found


def _class_name(annotation: ast.expr | None) -> str | None:
    """``C``, ``C | None``, ``Optional[C]`` or any of them quoted: C; otherwise None."""
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        try:
            annotation = ast.parse(annotation.value, mode="eval").body
        except SyntaxError:
            return None
    if isinstance(annotation, ast.Name):
        return annotation.id
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        sides = [annotation.left, annotation.right]
        names = [s for s in sides if not (isinstance(s, ast.Constant) and s.value is None)]
        return _class_name(names[0]) if len(names) == 1 else None
    if (
        isinstance(annotation, ast.Subscript)
        and isinstance(annotation.value, ast.Name)
        and annotation.value.id == "Optional"
    ):
        return _class_name(annotation.slice)
    return None


def _slot_types(node: ast.ClassDef, slots: set[str]) -> dict[str, str]:
    """Slot -> the class name its ``__init__`` gives it (by annotation or from a parameter)."""
    init = next(
        (f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None
    )
    if init is None:
        return {}
    params = {
        a.arg: _class_name(a.annotation)
        for a in [*init.args.posonlyargs, *init.args.args, *init.args.kwonlyargs]
    }
    types: dict[str, str] = {}
    conflicting: set[str] = set()
    for statement in ast.walk(init):
        target: ast.expr | None = None
        name: str | None = None
        if isinstance(statement, ast.AnnAssign):
            target, name = statement.target, _class_name(statement.annotation)
        elif isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target = statement.targets[0]
            value = statement.value
            name = params.get(value.id) if isinstance(value, ast.Name) else None
        if not (
            isinstance(target, ast.Attribute)
            and isinstance(target.value, ast.Name)
            and target.value.id == "self"
            and target.attr in slots
        ):
            continue
        if name is None:
            continue
        if types.setdefault(target.attr, name) != name:
            conflicting.add(target.attr)
    return {k: v for k, v in types.items() if k not in conflicting}


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


def _cythonize(source: Any, tmp: str, original: Path) -> Any:
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
        # Cython printed the error with its file and line; a typed text has the same lines.
        if Path(source.sources[0]) != original:
            print(
                f"({source.sources[0]} is {original} as compiled: the lines are the same)",
                file=sys.stderr,
            )
        return None


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
