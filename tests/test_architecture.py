"""The package's module structure: no import cycle, the trainer independent of the shapes world, and no
function-local imports of flowalign modules (a cycle held together by local imports is still a cycle).

The import graph is read from the source (the AST of every ``import`` statement, at module level and
inside functions alike), over every module of the distribution: ``flowalign``, ``flowalign.bench``,
``flowalign.rewards`` (folder ``rewards/``) and ``flowalign.pipelines`` (folder ``pipelines/``), mapped
through pyproject's ``[tool.setuptools.package-dir]``. Imports by name at run time
(``importlib.import_module`` in the lazy attribute tables, the CLI's subcommand table and the reward
registry) are dispatch, not import statements, and are not edges.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "flowalign"


def module_files() -> dict[str, Path]:
    """``{module name: file}`` for every ``.py`` file of every package that pyproject declares."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir = setuptools.get("package-dir", {})
    modules: dict[str, Path] = {}
    for package in setuptools["packages"]:
        # a package's folder: its own package-dir entry, else its parent's folder + its last name part
        parts = package.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in package_dir:
                folder = ROOT / package_dir[".".join(parts[:i])] / Path(*parts[i:])
                break
        else:
            folder = ROOT / Path(*parts)
        for path in sorted(folder.glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


MODULES = module_files()


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported flowalign module
    path: Path
    line: int
    local: bool  # inside a function (or lambda)
    node: ast.stmt

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _resolve(name: str) -> str | None:
    """The flowalign module ``name`` is, or is inside (``flowalign.shapes.render`` -> ``flowalign.shapes``)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute module of ``from [.]*X import ...`` written in ``module``."""
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_in(source: str, module: str, path: Path) -> list[Import]:
    """Every import of a flowalign module in ``source`` (the code of ``module``): one per (statement, target)."""
    tree = ast.parse(source, str(path))
    found: list[Import] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets: list[str | None] = []
            if isinstance(child, ast.Import):
                targets = [_resolve(alias.name) for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = _absolute(module, child)
                # `from flowalign import shapes` imports the module flowalign.shapes; `from X import name`, X
                targets = [_resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in MODULES else _resolve(base)
                           for alias in child.names]
            for target in dict.fromkeys(t for t in targets if t and t != module):
                found.append(Import(module, target, path, child.lineno, local, child))
            visit(child, inner)

    visit(tree, False)
    return found


def imports_of(module: str) -> list[Import]:
    return imports_in(MODULES[module].read_text(), module, MODULES[module])


EDGES = [imp for module in MODULES for imp in imports_of(module)]


def find_cycles(edges: list[Import]) -> list[list[Import]]:
    """One cycle (as its list of edges) per strongly connected component with more than one module."""
    graph: dict[str, list[Import]] = {}
    for e in edges:
        graph.setdefault(e.source, []).append(e)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for e in graph.get(v, []):
            w = e.target
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles = []
    for component in components:  # a shortest path back to the start, inside the component
        start = min(component)
        paths: dict[str, list[Import]] = {start: []}
        frontier = [start]
        cycle = None
        while frontier and cycle is None:
            nxt = []
            for v in frontier:
                for e in graph.get(v, []):
                    if e.target == start:
                        cycle = paths[v] + [e]
                        break
                    if e.target in component and e.target not in paths:
                        paths[e.target] = paths[v] + [e]
                        nxt.append(e.target)
                if cycle:
                    break
            frontier = nxt
        cycles.append(cycle)
    return cycles


def describe(cycle: list[Import]) -> str:
    return " -> ".join([cycle[0].source] + [f"{e.target} ({e.where()}{', local' if e.local else ''})" for e in cycle])


def test_the_graph_covers_the_whole_distribution():
    for name in ("flowalign", "flowalign.trainer", "flowalign.tiny", "flowalign.checkpoints", "flowalign.bench",
                 "flowalign.rewards", "flowalign.rewards.base", "flowalign.rewards.registry", "flowalign.pipelines",
                 "flowalign.pipelines.rlg"):
        assert name in MODULES, name
    assert MODULES["flowalign.rewards.registry"] == ROOT / "rewards" / "registry.py"
    # known edges: `from flowalign.x import y` and `from flowalign import x`
    assert any(e.source == "flowalign.rewards.registry" and e.target == "flowalign.rewards.base" and not e.local
               for e in EDGES)
    assert any(e.source == "flowalign.pretrain" and e.target == "flowalign.shapes" for e in EDGES)


def test_imports_in_sees_local_relative_and_from_package_imports():
    source = ("import os\nfrom flowalign import shapes, __version__\nfrom .base import Reward\n"
              "def f():\n    from flowalign.rewards.registry import load  # a reason\n    return lambda: __import__('x')\n")
    found = imports_in(source, "flowalign.rewards.mixture", ROOT / "rewards" / "mixture.py")
    assert [(e.target, e.line, e.local) for e in found] == [
        ("flowalign.shapes", 2, False), ("flowalign", 2, False), ("flowalign.rewards.base", 3, False),
        ("flowalign.rewards.registry", 5, True)]


def test_find_cycles_reports_a_cycle_held_together_by_a_local_import():
    def edge(a: str, b: str, local: bool = False) -> Import:
        return Import(a, b, ROOT / "x.py", 1, local, ast.Pass())

    assert find_cycles([edge("a", "b"), edge("b", "c")]) == []
    cycles = find_cycles([edge("a", "b"), edge("b", "c"), edge("c", "a", local=True), edge("c", "d")])
    assert len(cycles) == 1 and [(e.source, e.target) for e in cycles[0]] == [("a", "b"), ("b", "c"), ("c", "a")]
    assert describe(cycles[0]).endswith("a (x.py:1, local)")


def test_no_import_cycle_among_flowalign_modules():
    cycles = find_cycles(EDGES)
    assert not cycles, "import cycles (module -> imported module (file:line)):\n" + "\n".join(map(describe, cycles))


def test_the_trainer_does_not_import_the_shapes_world():
    edges = [e.where() for e in EDGES if e.source == "flowalign.trainer" and e.target == "flowalign.shapes"]
    assert not edges, f"flowalign.trainer imports flowalign.shapes at {edges}; take prompts from a prompt source"
    edges = [e.where() for e in EDGES if e.source == "flowalign.trainer" and e.target == "flowalign.tiny"]
    assert not edges, (f"flowalign.trainer imports flowalign.tiny at {edges}; the embedded model is the policy's "
                       "default (flowalign.policy.load_sd3_pipeline, default_guidance_scale)")


def _comments(path: Path) -> dict[int, str]:
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return {t.start[0]: t.string for t in tokens if t.type == tokenize.COMMENT}


FILES = sorted({str(path.relative_to(ROOT)) for path in MODULES.values()})


@pytest.mark.parametrize("file", FILES)
def test_no_function_local_imports_of_flowalign_modules(file):
    local = [f"{e.where()}: {e.target}" for e in EDGES if e.local and str(e.path.relative_to(ROOT)) == file]
    assert not local, "function-local imports of flowalign modules (import them at module level):\n" + "\n".join(local)


def local_imports_without_reason(path: Path) -> list[str]:
    """Function-local imports with no comment giving a reason, on their line or on the line above the group
    of consecutive imports they belong to. (Only optional or heavy dependencies belong inside functions.)"""
    comments = _comments(path)
    tree = ast.parse(path.read_text(), str(path))
    missing = []
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for body in [func.body] + [getattr(n, f) for n in ast.walk(func) if n is not func
                                   for f in ("body", "orelse", "finalbody", "handlers") if isinstance(getattr(n, f, None), list)]:
            group_reason = False
            previous_was_import = False
            for stmt in body:
                if not isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    previous_was_import = False
                    continue
                if not previous_was_import:
                    group_reason = stmt.lineno - 1 in comments
                previous_was_import = True
                own = any(line in comments for line in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
                if not (own or group_reason):
                    missing.append(f"{path.relative_to(ROOT)}:{stmt.lineno}: {ast.unparse(stmt)}")
    return sorted(set(missing))


@pytest.mark.parametrize("file", FILES)
def test_function_local_imports_give_their_reason(file):
    missing = local_imports_without_reason(ROOT / file)
    assert not missing, ("function-local imports need a one-line comment saying why they are local (an optional "
                         "or heavy dependency), or belong at module level:\n" + "\n".join(missing))


def test_the_readme_layout_names_every_module_once():
    """README's "Layout": one line per module of flowalign/ (and each package folder), every named path exists."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    named = [line.split()[0] for line in block.strip().splitlines()]
    assert len(named) == len(set(named)), named
    for path in named:
        assert (ROOT / path).exists(), f"README Layout names {path}, which does not exist"
    modules = sorted(f"flowalign/{p.name}" for p in (ROOT / "flowalign").glob("*.py") if p.name != "__init__.py")
    missing = [m for m in modules if m not in named]
    assert not missing, f"README Layout lacks {missing}"
    assert {"flowalign/bench/", "rewards/", "pipelines/rlg.py"} <= set(named)
