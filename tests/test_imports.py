"""The package's structure, read with ast from the source: no import cycles, the core never
imports replica_dist.experiments, and no module of the core is long without saying why.

Every import counts, at module level or inside a function (one inside a function that closes a
cycle is a cycle all the same, only deferred), except under `if TYPE_CHECKING:`, which never runs.
Importing `a.b.c` also runs the packages `a.b` and `a` that hold it, so an import of a module
inside a package is an edge to that package as well, unless the importer lives in it (a package's
own modules import each other while it initialises)."""

from __future__ import annotations

import ast
from pathlib import Path

from trainer_runs import REPO

PACKAGE = REPO / "replica_dist"
LONG_LINES = 500
"""A core module longer than this says why in its docstring, in a sentence "Why one module ...".
"""


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            yield from (n for stmt in child.orelse for n in _import_nodes_of(stmt))
            continue
        yield from _import_nodes_of(child)


def _import_nodes_of(node: ast.AST):
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    yield from _import_nodes(node)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the package under `root` that it imports, directly."""
    files = {_module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported: set[str] = set()
        for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
                continue
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            base = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            imported.add(base)
            imported |= {f"{base}.{alias.name}" for alias in node.names}
        own = {name, *_ancestors(name)}
        edges = set()
        for target in imported:
            edges |= {t for t in (target, *_ancestors(target)) if t in files and t not in own}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a closed path of imports) for every strongly connected set of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            members = []
            while not members or members[-1] != module:
                members.append(stack.pop())
            if len(members) > 1:
                found.append(_closed_path(graph, set(members), module))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def _closed_path(graph: dict[str, set[str]], members: set[str], start: str) -> list[str]:
    """A shortest path from `start` back to itself inside `members`."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for module in frontier:
            for target in sorted(graph[module] & members):
                if target == start:
                    return [*paths[module], start]
                if target not in paths:
                    paths[target] = [*paths[module], target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def _write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_walk_finds_a_cycle_closed_inside_a_function_and_through_a_package(tmp_path):
    package = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg import b\n",
            "pkg/b.py": "def f():\n    from . import a\n",
            "pkg/sub/__init__.py": "from pkg.sub.low import x\nfrom pkg.sub import high\n",
            "pkg/sub/low.py": "x = 1\n",
            "pkg/sub/high.py": "from .low import x\n",
            "pkg/c.py": "import pkg.sub.low\n",
            "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\n",
            "pkg/sub/deep.py": "def g():\n    from ..c import y\n",
        },
    )
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert graph["pkg.c"] == {"pkg.sub", "pkg.sub.low"}
    assert graph["pkg.sub"] == {"pkg.sub.low", "pkg.sub.high"} and graph["pkg.sub.high"] == {"pkg.sub.low"}
    assert graph["pkg.d"] == set()
    assert graph["pkg.sub.deep"] == {"pkg.c"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]
    # the module importing a module of a package that, while it initialises, imports the first one
    (package / "sub" / "high.py").write_text("from .low import x\n\n\ndef h():\n    import pkg.c\n")
    assert cycles(import_graph(package)) == [
        ["pkg.a", "pkg.b", "pkg.a"],
        ["pkg.c", "pkg.sub", "pkg.sub.high", "pkg.c"],
    ]


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert "replica_dist.config.load" in graph["replica_dist.config"]  # the walk sees the package
    assert cycles(graph) == []


def test_the_core_never_imports_the_experiments():
    graph = import_graph(PACKAGE)
    core = {m for m in graph if not m.startswith("replica_dist.experiments")}
    assert {
        m: sorted(t for t in graph[m] if t.startswith("replica_dist.experiments")) for m in core
    } == dict.fromkeys(core, [])


def test_no_core_module_is_long_without_saying_why():
    unexplained = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("experiments/"):
            continue
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        if lines > LONG_LINES and "Why one module" not in (ast.get_docstring(ast.parse(text)) or ""):
            unexplained[relative] = lines
    assert unexplained == {}
