"""The compiled gateway modules (gateway/speedups.py): used only when every one matches its source.

The loader's rules are judged on a small package tree of its own (`pkg`, `pkg.sub`) with
stand-in binaries and a manifest as the build writes them; the build itself on that tree with
two tiny modules (a couple of seconds); the real gateway in a subprocess, so that CI (CI=true,
after `make build`) cannot pass while testing the Python sources only.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.speedups import (
    DEBUG_INFO,
    DECLARATIONS,
    DIRECTIVES,
    DISABLE,
    GATEWAY,
    MODULES,
    BuildError,
    CompiledTree,
    Verdict,
    compiler_settings,
    interfaces_key,
)

SOURCES = {
    "pkg.a": "def answer():\n    return 42\n",
    "pkg.sub.b": "from pkg.a import answer\n\n\ndef twice():\n    return 2 * answer()\n",
}
STALE = (
    "cityplane: compiled gateway modules are out of date ({}); running the Python sources; "
    "rebuild with: make build\n"
)
HAS_CYTHON = importlib.util.find_spec("Cython") is not None


@pytest.fixture(autouse=True)
def _extensions_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DISABLE, raising=False)


def _sources(base: Path) -> CompiledTree:
    for package in ("pkg", "pkg/sub"):
        (base / package).mkdir(parents=True, exist_ok=True)
        (base / package / "__init__.py").write_text("")
    tree = CompiledTree(base, list(SOURCES))
    for module, text in SOURCES.items():
        tree.source(module).write_text(text)
    return tree


def _built(base: Path, cython: str = "3.3.1") -> CompiledTree:
    """The tree as build() leaves it, with empty stand-ins for the binaries."""
    tree = _sources(base)
    for module in SOURCES:
        tree.binary(module).parent.mkdir(parents=True, exist_ok=True)
        tree.binary(module).write_bytes(b"")
    hashes = {m: hashlib.sha256(tree.source(m).read_bytes()).hexdigest() for m in SOURCES}
    manifest = {
        "cython": cython,
        "directives": DIRECTIVES,
        "declarations": DECLARATIONS,
        "interfaces": interfaces_key(tree.declarations()),
        "compiler": compiler_settings(),
        "modules": hashes,
    }
    tree.manifest_path.write_text(json.dumps(manifest))
    return CompiledTree(base, list(SOURCES))  # a new process, as it were: nothing judged yet


def _paths(tree: CompiledTree) -> tuple[list[str], list[str]]:
    top, sub = ["/src/pkg"], ["/src/pkg/sub"]
    tree.activate("pkg", top)
    tree.activate("pkg.sub", sub)
    return top, sub


def test_fresh_build_goes_first_on_each_package_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = _built(tmp_path)
    top, sub = _paths(tree)
    assert top == [str(tree.root / "pkg"), "/src/pkg"]
    assert sub == [str(tree.root / "pkg" / "sub"), "/src/pkg/sub"]
    assert tree.verdict == Verdict(True, "Cython 3.3.1")
    assert capsys.readouterr().err == ""


def test_changed_source_runs_the_python_sources_and_says_so_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = _built(tmp_path)
    tree.source("pkg.a").write_text(SOURCES["pkg.a"] + "\n")
    assert _paths(tree) == (["/src/pkg"], ["/src/pkg/sub"])
    assert capsys.readouterr().err == STALE.format("pkg/a.py changed")


def test_one_changed_module_keeps_every_compiled_module_out(tmp_path: Path) -> None:
    tree = _built(tmp_path)
    tree.source("pkg.sub.b").write_text(SOURCES["pkg.sub.b"] + "# edited\n")
    top, _ = _paths(tree)
    assert top == ["/src/pkg"]  # pkg.a is fresh, but it would run beside a stale pkg.sub.b
    assert tree.verdict == Verdict(False, "out of date: pkg/sub/b.py changed")


def test_missing_compiled_module_counts_as_out_of_date(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = _built(tmp_path)
    tree.binary("pkg.a").unlink()
    assert _paths(tree) == (["/src/pkg"], ["/src/pkg/sub"])
    assert capsys.readouterr().err == STALE.format("pkg/a.py not built")


def test_module_dropped_from_the_list_keeps_the_old_build_out(tmp_path: Path) -> None:
    _built(tmp_path)
    tree = CompiledTree(tmp_path, ["pkg.a"])  # pkg.sub.b's binary would still be imported
    assert tree.verdict == Verdict(False, "out of date: the list of compiled modules changed")


def test_no_extensions_variable_runs_the_python_sources_silently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(DISABLE, "1")
    tree = _built(tmp_path)
    assert _paths(tree) == (["/src/pkg"], ["/src/pkg/sub"])
    assert tree.verdict == Verdict(False, "CITYPLANE_NO_EXTENSIONS=1")
    assert capsys.readouterr().err == ""


def test_without_a_manifest_the_python_sources_run_silently(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = _built(tmp_path)
    tree.manifest_path.unlink()  # as after a build that failed half-way
    assert _paths(tree) == (["/src/pkg"], ["/src/pkg/sub"])
    assert tree.verdict == Verdict(False, "")
    assert capsys.readouterr().err == ""


def test_unreadable_manifest_runs_the_python_sources_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = _built(tmp_path)
    tree.manifest_path.write_text("{not json")
    assert _paths(tree) == (["/src/pkg"], ["/src/pkg/sub"])
    assert capsys.readouterr().err == STALE.format("manifest.json unreadable")


@pytest.mark.skipif(not HAS_CYTHON, reason="Cython is not installed")
def test_build_is_skipped_while_the_manifest_matches_every_source(tmp_path: Path) -> None:
    from Cython.Shadow import __version__ as cython

    tree = _built(tmp_path, cython=cython)
    assert tree.out_of_date(tree.manifest()) == []
    expected = f"gateway modules: compiled with Cython {cython}, up to date with the sources"
    assert tree.build(jobs=1) == expected
    tree.source("pkg.sub.b").write_text(SOURCES["pkg.sub.b"] + "\n")
    assert tree.out_of_date(tree.manifest()) == ["pkg.sub.b"]
    # Another Cython (other directives, other declarations) built the rest: all are rebuilt.
    assert tree.out_of_date(None) == ["pkg.a", "pkg.sub.b"]


def _package(tmp_path: Path, modules: dict[str, str]) -> CompiledTree:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    tree = CompiledTree(tmp_path, list(modules))
    for name, text in modules.items():
        tree.source(name).write_text(text)
    return tree


def _run_compiled(tmp_path: Path, modules: dict[str, str], body: str) -> list[str]:
    """Build ``modules`` (package ``pkg`` under ``tmp_path``), then run ``body`` in a fresh
    interpreter that imports their compiled forms; its printed lines."""
    tree = _package(tmp_path, modules)
    assert f" compiled {len(modules)} of {len(modules)} " in tree.build(jobs=2)
    preamble = (
        "import sys; from pathlib import Path\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import pkg\n"
        "from gateway.speedups import CompiledTree\n"
        f"CompiledTree(Path({str(tmp_path)!r}), {list(modules)!r}).activate('pkg', pkg.__path__)\n"
    )
    return _python(preamble + body)


def _python(program: str, env: dict[str, str] | None = None) -> list[str]:
    """Run ``program`` in a fresh interpreter from the repository; its stdout lines (it must
    exit 0: its stderr is the failure message)."""
    done = subprocess.run(
        [sys.executable, "-c", program],
        cwd=GATEWAY.base,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def _import_from_tree(base: Path) -> list[str]:
    """In a fresh interpreter: activate the tree, import both modules, call them."""
    program = (
        "import sys; from pathlib import Path\n"
        f"sys.path.insert(0, {str(base)!r})\n"
        "import pkg, pkg.sub\n"
        "from gateway.speedups import CompiledTree\n"
        f"tree = CompiledTree(Path({str(base)!r}), {list(SOURCES)!r})\n"
        "tree.activate('pkg', pkg.__path__); tree.activate('pkg.sub', pkg.sub.__path__)\n"
        "import pkg.a, pkg.sub.b\n"
        "print(pkg.a.__file__, pkg.sub.b.__file__, pkg.sub.b.twice())\n"
    )
    return " ".join(_python(program)).split()


SLOTTED = """\
import weakref


class Base:
    __slots__ = ("count", "name", "__weakref__")
    LIMIT = 3

    def __init__(self, name):
        self.name = name
        self.count = 0

    def bump(self):
        self.count += 1
        return self.count

    def add(self, step=1):
        self.count += step
        return self.count

    def bump_twice(self):
        self.bump()
        return self.bump()


class Child(Base):
    __slots__ = ("extra",)


class Plain:
    pass


@staticmethod
def _unused():
    pass
"""


def test_declarations_make_plain_slotted_classes_cdef_classes_with_public_slots() -> None:
    from gateway.speedups import cdef_declarations

    assert cdef_declarations(SLOTTED) == (
        "cdef class Base:\n"
        "    cdef object __weakref__\n"
        "    cdef public object count, name\n"
        "    cpdef bump(self)\n"
        "    cpdef add(self, step=*)\n"
        "    cpdef bump_twice(self)\n"
        "\n"
        "cdef class Child(Base):\n"
        "    cdef public object extra\n"
    )


@pytest.mark.parametrize(
    "source",
    [
        "import asyncio\nclass P(asyncio.Protocol):\n    __slots__ = ('a',)\n",  # foreign base
        "class E(Exception):\n    __slots__ = ('a',)\n",  # a base not declared here
        "import dataclasses\n@dataclasses.dataclass(slots=True)\nclass D:\n    a: int\n",
        "class M(metaclass=type):\n    __slots__ = ('a',)\n",
        "class N:\n    __slots__ = ('__private',)\n",  # mangled to _N__private
        "class V:\n    __slots__ = NAMES\n",  # not literal
        "class W:\n    pass\n",  # no slots: instances take any attribute
        "def broken(:\n",  # Cython reports the syntax error itself
    ],
)
def test_classes_that_could_behave_differently_are_not_declared(source: str) -> None:
    from gateway.speedups import cdef_declarations

    assert cdef_declarations(source) == ""


@pytest.mark.skipif(not HAS_CYTHON, reason="Cython is not installed")
def test_a_compiled_slotted_class_is_an_extension_type_that_behaves_as_before(
    tmp_path: Path,
) -> None:
    program = (
        "import weakref\n"
        "from pkg.a import Base, Child\n"
        "assert Base.__module__ == 'pkg.a' and 'pkg/a.py' not in sys.modules['pkg.a'].__file__\n"
        "heap = 1 << 9  # Py_TPFLAGS_HEAPTYPE: classes made by a class statement have it\n"
        "print(bool(Base.__flags__ & heap), bool(Child.__flags__ & heap))\n"
        "c = Child('x'); c.extra = 1\n"
        "print(c.bump(), c.bump(), c.name, c.extra, Child.LIMIT, weakref.ref(c)() is c)\n"
        "print(c.add(), c.add(step=3), c.bump_twice())\n"
        "try:\n    c.other = 1\nexcept AttributeError:\n    print('no other attribute')\n"
        "class Sub(Base):  # a Python subclass may still override a method\n"
        "    def bump(self):\n        return -1\n"
        "print(Sub('y').bump(), Sub('z').bump_twice())  # also from the C call in bump_twice\n"
    )
    assert _run_compiled(tmp_path, {"pkg.a": SLOTTED}, program) == [
        "False False",
        "1 2 x 1 3 True",
        "3 6 8",
        "no other attribute",
        "-1 -1",
    ]


METHODS = """\
class Engine:
    __slots__ = ("part",)

    def __init__(self, part: Part) -> None:
        self.part = part

    def plain(self, a, b=2):
        return [x for x in (a, b)]  # a comprehension is no closure

    def typed(self, part: Part, label: str):
        return part

    @property
    def decorated(self):
        return 1

    def __len__(self):
        return 0

    def generator(self):
        yield 1

    async def coroutine(self):
        return 1

    def closure(self):
        return lambda: self

    def generator_expression(self):
        return sum(x for x in ())

    def star(self, *args):
        return args

    def keyword(self, *, key=1):  # keyword-only: declared as a plain one (ADR 19)
        return key

    def keyword_after_default(self, a=1, *, b):  # no positional form of it exists
        return b

    def overridden(self):
        return 1

    def overridden_by_a_closure(self):
        return 1


class Part:
    __slots__ = ()


class Turbo(Engine):
    __slots__ = ()

    def overridden(self):
        return 2

    def overridden_by_a_closure(self):
        return (lambda: 2)()
"""


def test_plain_methods_are_declared_cpdef_and_the_others_stay_def() -> None:
    from gateway.speedups import cdef_declarations

    assert cdef_declarations(METHODS) == (
        "cdef class Part\n"
        "\n"
        "cdef class Engine:\n"
        "    cdef public Part part\n"
        "    cpdef plain(self, a, b=*)\n"
        "    cpdef typed(self, Part part, label)\n"
        "    cpdef keyword(self, key=*)\n"
        "\n"
        "cdef class Part:\n"
        "    pass\n"
        "\n"
        "cdef class Turbo(Engine):\n"
        "    pass\n"
    )


FUNCTIONS = """\
import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pkg.other import Remote


class Box:
    __slots__ = ("n",)


def plain(a, b=2):
    return [x for x in (a, b)]  # a comprehension is no closure


def typed(box: Box, remote: Remote, label: str):
    return box


def no_parameters():
    return plain(1, b=3)


@functools.cache
def decorated(a):
    return a


def generator():
    yield 1


async def coroutine():
    return 1


def closure():
    return lambda: 1


def star(*args):
    return args


def keyword(*, key=1):
    return key


def keyword_after(a, *, key=1):
    return key


def __getattr__(name):
    raise AttributeError(name)


def rebound():
    return 1


rebound = functools.partial(rebound)


def twice():
    return 1


def twice():  # noqa: F811
    return 2


def declared_global():
    return 1


def rebinds():
    global declared_global
    declared_global = None


def double(a):  # a C type's name in a .pxd
    return a


def c_word(long):
    return long


if TYPE_CHECKING:
    def nested():
        return 1
"""


def test_module_functions_are_declared_cpdef_when_their_name_is_bound_once() -> None:
    from gateway.speedups import cdef_declarations

    assert cdef_declarations(FUNCTIONS, "pkg.f", {"pkg.other": ["Remote"]}) == (
        "from pkg.other cimport Remote\n"
        "\n"
        "cdef class Box:\n"
        "    cdef public object n\n"
        "\n"
        "cpdef plain(a, b=*)\n"
        "cpdef typed(Box box, Remote remote, label)\n"
        "cpdef no_parameters()\n"
        "cpdef keyword_after(a, key=*)\n"
        "cpdef rebinds()\n"
    )
    # A module of functions only gets its declarations too.
    assert cdef_declarations("def f(a):\n    return g(a)\n\ndef g(a):\n    return a\n") == (
        "cpdef f(a)\ncpdef g(a)\n"
    )


CALLS = """\
def times(a, b=2):
    return a * b


def use(a):
    return times(a), times(a, b=3), times(a, 4), scaled(a, by=2, plus=1), scaled(a, plus=0)


def scaled(a, *, plus, by=1):
    return a * by + plus
"""


@pytest.mark.skipif(not HAS_CYTHON, reason="Cython is not installed")
def test_a_compiled_module_calls_its_own_functions_in_c_and_python_still_can(
    tmp_path: Path,
) -> None:
    program = (
        "import pkg.calls as m\n"
        "assert 'pkg/calls.py' not in m.__file__\n"
        "print(m.use(5), m.times(5), m.times(5, b=10), m.times(b=1, a=7))\n"
        "print(m.scaled(3, plus=1), m.scaled(3, by=3, plus=0))\n"
        "# The compiled-only difference ADR 19 names: rebinding the module attribute changes\n"
        "# what other modules call, not the module's own positional calls.\n"
        "m.times = lambda a, b=2: 'patched'\n"
        "print(m.use(5)[0], m.use(5)[2])\n"
    )
    assert _run_compiled(tmp_path, {"pkg.calls": CALLS}, program) == [
        "(10, 15, 20, 11, 5) 10 50 7",
        "4 9",
        "10 20",
    ]


def test_the_typed_source_drops_the_keyword_only_marker_of_cpdef_functions_only() -> None:
    from gateway.speedups import typed_source

    source = (
        "def start(self, head, *, is_head, deadline=None):\n"
        "    return head\n"
        "\n"
        "def spread(\n"
        "    self,\n"
        "    *,\n"
        "    label='*,',\n"
        "):\n"
        "    return label\n"
        "\n"
        "def stays(a=1, *, b):\n"
        "    return b\n"
        "\n"
        "def only(*, key):\n"
        "    return key\n"
    )
    typed = typed_source(source)
    assert typed.splitlines() == [
        "def start(self, head,    is_head, deadline=None):",
        "    return head",
        "",
        "def spread(",
        "    self,",
        "      ",
        "    label='*,',",
        "):",
        "    return label",
        "",
        "def stays(a=1, *, b):",
        "    return b",
        "",
        "def only(*, key):",
        "    return key",
    ]


TYPED = """\
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from pkg.other import Remote as Far


class Node:
    __slots__ = ("after", "before", "far", "label", "maybe", "quoted", "spare", "twice")

    def __init__(self, before: Node | None, far: Far, label: str, twice: Node) -> None:
        self.before = before
        self.far = far
        self.label = label  # a builtin: stays an object (no exact-type check, no coercion)
        self.after: Later | None = None
        self.maybe: Optional[Later] = None
        self.quoted: "Node | None" = None
        self.twice = twice
        if label:
            self.twice = label  # two different types: stays an object
        self.spare = None


class Later:
    __slots__ = ("node",)
"""


def test_slots_set_from_extension_class_annotations_are_declared_with_that_type() -> None:
    from gateway.speedups import cdef_declarations, extension_classes

    assert extension_classes(TYPED) == ["Node", "Later"]
    others = {"pkg.other": ["Remote"], "pkg.typed": ["Node", "Later"]}
    assert cdef_declarations(TYPED, "pkg.typed", others) == (
        "from pkg.other cimport Remote as Far\n"
        "cdef class Later\n"
        "\n"
        "cdef class Node:\n"
        "    cdef public Later after\n"
        "    cdef public Node before\n"
        "    cdef public Far far\n"
        "    cdef public Later maybe\n"
        "    cdef public Node quoted\n"
        "    cdef public object label, spare, twice\n"
        "\n"
        "cdef class Later:\n"
        "    cdef public object node\n"
    )
    # Without the other module's classes, its name is just a name: an object slot.
    assert "cdef public object far," in cdef_declarations(TYPED, "pkg.typed", {})


ANNOTATED = """\
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from pkg.other import Remote


@dataclasses.dataclass
class Plain:
    when: float  # a class body's annotations are the dataclass's fields: untouched


class Node:
    __slots__ = ("next",)

    def __init__(self, next: Node | None, remote: Remote, n: float, *rest: Node, **kw: str) -> None:
        self.next: Optional[Node] = next
        count: int = 0
        here: "Node" = self
        table: dict[
            str,  # a comment inside the annotation
            int,
        ] = {}


async def fetch(node: Node, label: str = "x") -> Node:
    return node
"""


def test_the_typed_source_keeps_extension_class_annotations_and_hides_the_others() -> None:
    from gateway.speedups import typed_source

    others = {"pkg.other": ["Remote"]}
    typed = typed_source(ANNOTATED, "pkg.typed", others)
    assert typed.count("\n") == ANNOTATED.count("\n")  # tracebacks keep their lines
    assert ast.dump(ast.parse(typed)) != ast.dump(ast.parse(ANNOTATED))
    lines = typed.splitlines()
    assert (
        "    when: float  # a class body's annotations are the dataclass's fields: untouched"
        in lines
    )
    assert (
        "    def __init__(self, next: Node | None, remote: Remote, n: object, *rest: object,"
        " **kw: object) -> object:"
    ) in lines
    assert "        self.next: Optional[Node] = next" in lines
    assert "        count: object = 0" in lines
    assert '        here: "Node" = self' in lines
    assert "        table: object \\" in lines
    assert 'async def fetch(node: Node, label: object = "x") -> object:' in lines
    # Without the other module's classes, Remote is just a name: a hint.
    assert "remote: object" in typed_source(ANNOTATED, "pkg.typed", {})
    assert typed_source("def broken(:\n", "pkg.x", {}) == "def broken(:\n"
    assert typed_source("def f(x):\n    return x\n", "pkg.x", {}) == "def f(x):\n    return x\n"


TWO_MODULES = {
    "pkg.a": (
        "class Leaf:\n"
        "    __slots__ = ('value',)\n"
        "\n"
        "    def __init__(self, value):\n"
        "        self.value = value\n"
    ),
    "pkg.b": (
        "from __future__ import annotations\n"
        "from pkg.a import Leaf\n"
        "\n"
        "class Holder:\n"
        "    __slots__ = ('leaf',)\n"
        "\n"
        "    def __init__(self, leaf: Leaf | None) -> None:\n"
        "        self.leaf = leaf\n"
        "\n"
        "    def read(self):\n"
        "        return self.leaf.value\n"
        "\n"
        "def kinds(x: float, s: str, flag: bool, items: list[int]) -> tuple[str, ...]:\n"
        "    return type(x).__name__, type(s).__name__, repr(flag), type(items).__name__\n"
        "\n"
        "def value(leaf: Leaf) -> object:\n"
        "    return leaf.value\n"
        "\n"
        "def maybe(leaf: Leaf | None) -> object:\n"
        "    return leaf.value\n"
    ),
}


@pytest.mark.skipif(not HAS_CYTHON, reason="Cython is not installed")
def test_a_typed_slot_takes_its_class_subclasses_and_none_and_refuses_other_objects(
    tmp_path: Path,
) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    tree = CompiledTree(tmp_path, list(TWO_MODULES))
    for module, text in TWO_MODULES.items():
        tree.source(module).write_text(text)
    assert " compiled 2 of 2 " in tree.build(jobs=2)
    program = (
        "import sys; from pathlib import Path\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import pkg\n"
        "from gateway.speedups import CompiledTree\n"
        f"modules = {list(TWO_MODULES)!r}\n"
        f"CompiledTree(Path({str(tmp_path)!r}), modules).activate('pkg', pkg.__path__)\n"
        "from pkg.a import Leaf\n"
        "from pkg.b import Holder\n"
        "class Sub(Leaf):\n    pass\n"
        "print(Holder(Leaf(1)).read(), Holder(Sub(2)).read(), Holder(None).leaf)\n"
        "try:\n    Holder(object())\nexcept TypeError:\n    print('refused')\n"
        "from pkg import b\n"
        "class S(str):\n    pass\n"
        "class L(list):\n    pass\n"
        "print(*b.kinds(1, S('x'), 1, L()))  # builtin annotations stay hints\n"
        "print(b.value(Sub(3)), b.maybe(Leaf(4)))\n"
        "for call in (lambda: b.value(None), lambda: b.maybe(None), Holder(None).read):\n"
        "    try:\n        call()\n"
        "    except (TypeError, AttributeError) as exc:\n"
        "        print(type(exc).__name__)  # None is an error, never a crash\n"
    )

    answers = [
        "1 2 None",
        "refused",
        "int S 1 L",
        "3 4",
        "TypeError",
        "AttributeError",
        "AttributeError",
    ]
    assert _python(program) == answers
    # A new slot in pkg.a changes Leaf's layout, which pkg.b's C reads: both are rebuilt.
    tree.source("pkg.a").write_text(
        TWO_MODULES["pkg.a"].replace("('value',)", "('extra', 'value')")
    )
    assert " compiled 2 of 2 " in CompiledTree(tmp_path, list(TWO_MODULES)).build(jobs=2)
    assert _python(program) == answers
    # A change that keeps every declaration rebuilds only its own module.
    tree.source("pkg.b").write_text(TWO_MODULES["pkg.b"] + "\n\nANSWER = 42\n")
    assert " compiled 1 of 2 " in CompiledTree(tmp_path, list(TWO_MODULES)).build(jobs=2)


@pytest.mark.skipif(not HAS_CYTHON, reason="Cython is not installed")
def test_build_compiles_what_changed_and_the_loader_imports_it(tmp_path: Path) -> None:
    tree = _sources(tmp_path)
    assert " compiled 2 of 2 " in tree.build(jobs=2)
    assert _import_from_tree(tmp_path) == [
        str(tree.binary("pkg.a")),
        str(tree.binary("pkg.sub.b")),
        "84",
    ]
    tree.source("pkg.a").write_text("def answer():\n    return 21\n")
    assert " compiled 1 of 2 " in CompiledTree(tmp_path, list(SOURCES)).build(jobs=2)
    assert _import_from_tree(tmp_path)[2] == "42"
    beside_sources = [
        p for p in tmp_path.rglob("*") if p.suffix in (".c", ".so") and "_compiled" not in p.parts
    ]
    assert beside_sources == []


@pytest.mark.skipif(not HAS_CYTHON, reason="Cython is not installed")
def test_module_cython_rejects_is_one_build_error_without_a_traceback(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    tree = _sources(tmp_path)
    tree.source("pkg.a").write_text("def answer(:\n    return 42\n")
    with pytest.raises(BuildError, match=r"^Cython rejected pkg\.a \(its error is above\)$"):
        tree.build(jobs=2)
    err = capfd.readouterr().err
    assert f"{tree.source('pkg.a')}:1:" in err  # Cython's own message, with file and line
    assert "Traceback" not in err
    assert not tree.manifest_path.exists()


def _gateway_module_files(**env: str) -> subprocess.CompletedProcess[str]:
    program = (
        "import importlib\n"
        "from gateway.speedups import MODULES\n"
        "for name in MODULES:\n"
        "    print(importlib.import_module(name).__file__)\n"
    )
    environ = {k: v for k, v in os.environ.items() if k != DISABLE} | env
    return subprocess.run(
        [sys.executable, "-c", program],
        cwd=GATEWAY.base,
        env=environ,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )


def test_no_extensions_variable_imports_the_gateway_from_its_python_sources() -> None:
    done = _gateway_module_files(CITYPLANE_NO_EXTENSIONS="1")
    assert done.stdout.split() == [str(GATEWAY.source(m)) for m in MODULES]
    assert done.stderr == ""


def test_gateway_imports_its_compiled_modules_once_built() -> None:
    built = CompiledTree(GATEWAY.base, MODULES).verdict.compiled
    if not built and not os.environ.get("CI"):
        pytest.skip("the compiled gateway modules are not built or out of date (make build)")
    done = _gateway_module_files()
    assert done.stdout.split() == [str(GATEWAY.binary(m)) for m in MODULES], done.stderr
    assert done.stderr == ""


def test_compiled_modules_do_not_look_for_files_next_to_themselves() -> None:
    # A compiled module's __file__ is its binary in gateway/_compiled/<tag>/, not the source's
    # directory: a path built from it would point at nothing.
    users = [m for m in MODULES if "__file__" in GATEWAY.source(m).read_text(encoding="utf-8")]
    assert users == []


CROSS = {
    "pkg.low": "def times(a, b=2):\n    return a * b\n\n\ndef plus(a, b):\n    return a + b\n",
    "pkg.user": (
        "from pkg.low import plus as add, times\n"
        "from pkg.loop import back\n\n\n"
        "def use(a):\n    return times(a), add(a, 1), back(a)\n"
    ),
    # Imports pkg.user when it starts: pkg.user may not cimport from it (a cycle).
    "pkg.loop": (
        "import pkg.user\n\n\n"
        "def back(a):\n    return -a\n\n\n"
        "def forth(a):\n    return pkg.user.use(a)\n"
    ),
}


def test_functions_imported_from_another_compiled_module_are_cimported_without_cycles(
    tmp_path: Path,
) -> None:
    declarations = _package(tmp_path, CROSS).declarations()
    # Not `plus as add`: Cython would drop the module's Python-level name `add`.
    assert declarations["pkg.user"].splitlines()[:2] == ["from pkg.low cimport times", ""]
    assert "pkg.loop cimport" not in declarations["pkg.user"]


@pytest.mark.skipif(not HAS_CYTHON, reason="Cython is not installed")
def test_a_cimported_function_is_a_c_call_and_the_same_object_from_python(
    tmp_path: Path,
) -> None:
    program = (
        "import pkg.user as user, pkg.low as low, pkg.loop as loop\n"
        "assert 'user.py' not in user.__file__ and 'low.py' not in low.__file__\n"
        "print(user.use(5), loop.forth(2), user.times is low.times, user.add is low.plus)\n"
        "low.times = lambda a, b=2: 'patched'  # ADR 19: the cimporting module keeps C calls\n"
        "print(user.use(5)[0])\n"
    )
    assert _run_compiled(tmp_path, CROSS, program) == ["(10, 6, -5) (4, 3, -2) True True", "10"]


# pkg.conn types a slot with pkg.limits's class; pkg.cyclic's class is typed too, but
# pkg.cyclic imports pkg.conn when it starts, so pkg.conn may not cimport it.
TYPED_CROSS = {
    "pkg.limits": (
        "class Limits:\n    __slots__ = ('size',)\n\n"
        "    def __init__(self, size: int) -> None:\n        self.size = size\n"
    ),
    "pkg.cyclic": (
        "from pkg.conn import DEFAULT, Conn\n\n\n"
        "class Settings:\n    __slots__ = ('size',)\n\n"
        "    def __init__(self, size: int) -> None:\n        self.size = size\n\n\n"
        "def make(size=DEFAULT):\n    return Conn(Settings(size), size)\n"
    ),
    "pkg.conn": (
        "from __future__ import annotations\n\n"
        "from typing import TYPE_CHECKING\n\n"
        "from pkg.limits import Limits\n\n"
        "if TYPE_CHECKING:\n    from pkg.cyclic import Settings\n\n"
        "DEFAULT = 3  # bound by the module's body, as gateway.h1server's FrontServer\n\n\n"
        "class Conn:\n    __slots__ = ('limits', 'settings')\n\n"
        "    def __init__(self, settings: Settings, size: int) -> None:\n"
        "        self.limits: Limits = Limits(size)\n"
        "        self.settings = settings\n\n"
        "    def size(self) -> int:\n        return self.limits.size + self.settings.size\n"
    ),
}


def test_classes_of_a_module_that_imports_this_one_back_are_not_cimported(
    tmp_path: Path,
) -> None:
    declarations = _package(tmp_path, TYPED_CROSS).declarations()
    conn = declarations["pkg.conn"]
    assert "from pkg.limits cimport Limits" in conn
    assert "cdef public Limits limits" in conn
    assert "pkg.cyclic cimport" not in conn and "Settings settings" not in conn


@pytest.mark.skipif(not HAS_CYTHON, reason="Cython is not installed")
def test_compiled_modules_with_typed_classes_import_in_any_order(tmp_path: Path) -> None:
    # A cimport of pkg.cyclic's class from pkg.conn would import pkg.cyclic before pkg.conn's
    # body runs: `import pkg.conn` first then failed with ImportError (seen with
    # gateway.h1server and gateway.connections).
    program = (
        "import importlib\n"
        "conn = importlib.import_module('pkg.conn')\n"
        "cyclic = importlib.import_module('pkg.cyclic')\n"
        "assert 'conn.py' not in conn.__file__ and 'cyclic.py' not in cyclic.__file__\n"
        "print(cyclic.make().size())\n"
    )
    assert _run_compiled(tmp_path, TYPED_CROSS, program) == ["6"]


@pytest.mark.skipif(not HAS_CYTHON or os.name != "posix", reason="Cython and a POSIX compiler")
@pytest.mark.parametrize(("setting", "has_debug_info"), [(None, False), ("1", True)])
def test_compiled_modules_carry_debug_information_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str | None, has_debug_info: bool
) -> None:
    # Python's CFLAGS have -g: 37 MB of gateway modules with it, 6 MB without.
    if setting is None:
        monkeypatch.delenv(DEBUG_INFO, raising=False)
    else:
        monkeypatch.setenv(DEBUG_INFO, setting)
    tree = _package(tmp_path, {"pkg.one": "def one():\n    return 1\n"})
    assert " compiled 1 of 1 " in tree.build(jobs=1)
    assert (b".debug_info" in tree.binary("pkg.one").read_bytes()) is has_debug_info


@pytest.mark.skipif(not HAS_CYTHON or os.name != "posix", reason="Cython and a POSIX compiler")
def test_changed_compiler_settings_rebuild_every_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The manifest records what the compiler was told: with debug information asked for now,
    # or other CFLAGS, modules built without them are out of date although no source changed.
    monkeypatch.delenv(DEBUG_INFO, raising=False)
    monkeypatch.delenv("CFLAGS", raising=False)
    tree = _package(tmp_path, {"pkg.one": "def one():\n    return 1\n", "pkg.two": "X = 2\n"})
    assert " compiled 2 of 2 " in tree.build(jobs=1)
    assert "up to date" in tree.build(jobs=1)
    monkeypatch.setenv(DEBUG_INFO, "1")
    assert " compiled 2 of 2 " in tree.build(jobs=1)
    assert b".debug_info" in tree.binary("pkg.one").read_bytes()
    assert "up to date" in tree.build(jobs=1)
    monkeypatch.setenv("CFLAGS", "-O2")
    assert " compiled 2 of 2 " in tree.build(jobs=1)
    assert tree.manifest()["compiler"] == compiler_settings()


C_TYPED = """\
C_TYPES = {
    "count": {"data": "bytes", "start": "Py_ssize_t", "i": "Py_ssize_t", "c": "uchar",
              "seen": "bint"}
}


def count(data: bytes, start: int, byte: int) -> int:
    i = start
    seen = False
    n = 0
    while i < len(data):
        c = data[i]
        if c == byte:
            n += 1
            seen = True
        i += 1
    return n if seen else -1
"""


def test_c_types_declare_parameters_in_the_signature_and_locals_in_a_decorator() -> None:
    from gateway.speedups import cdef_declarations

    assert cdef_declarations(C_TYPED) == (
        "cimport cython\n"
        "\n"
        "@cython.locals(c=cython.uchar, i=Py_ssize_t, seen=cython.bint)\n"
        "cpdef count(bytes data, Py_ssize_t start, byte)\n"
    )


def test_the_typed_source_blanks_the_annotations_of_c_typed_parameters() -> None:
    from gateway.speedups import typed_source

    line = typed_source(C_TYPED).splitlines()[6]
    # Columns stay where they were: ": bytes" and ": int" become spaces.
    assert line == "def count(data       , start     , byte: object) -> object:"


@pytest.mark.parametrize(
    "declaration",
    [
        'C_TYPES = {"count": {"i": "long"}}',  # not a type C_TYPES may give
        'C_TYPES = {"count": {"i": SIZE}}',  # not a literal
        'C_TYPES = {"count": ["i"]}',
    ],
)
def test_c_types_other_than_the_known_literal_stop_the_build(declaration: str) -> None:
    from gateway.speedups import cdef_declarations

    with pytest.raises(ValueError, match="C_TYPES must be a literal dict"):
        cdef_declarations(declaration + "\n\n\ndef count(i):\n    return i\n")


@pytest.mark.skipif(not HAS_CYTHON, reason="Cython is not installed")
def test_a_compiled_function_runs_on_its_c_types(tmp_path: Path) -> None:
    program = (
        "import pkg.scan as m\n"
        "print(m.count(b'abcab', 0, 97), m.count(b'abcab', 1, 97), m.count(b'xyz', 0, 97))\n"
        "for bad in (('abc', 0, 97), (b'abc', '0', 97), (bytearray(b'abc'), 0, 97)):\n"
        "    try:\n"
        "        m.count(*bad)\n"
        "    except TypeError:\n"
        "        print('TypeError')\n"
    )
    # The sources take a str and a bytearray; the compiled form's C types refuse them.
    assert _run_compiled(tmp_path, {"pkg.scan": C_TYPED}, program) == [
        "2 1 -1",
        "TypeError",
        "TypeError",
        "TypeError",
    ]


@pytest.mark.skipif(not HAS_CYTHON, reason="Cython is not installed")
def test_a_refused_c_types_literal_is_a_build_error_naming_the_file(tmp_path: Path) -> None:
    from gateway.speedups import BuildError

    tree = _package(
        tmp_path, {"pkg.bad": 'C_TYPES = {"f": {"i": "long"}}\n\n\ndef f(i):\n    return i\n'}
    )
    with pytest.raises(BuildError, match=r"pkg/bad\.py: line 1: C_TYPES must be a literal dict"):
        tree.build(jobs=1)
