"""The import graph of deepship's modules, read with `ast` (function-level imports included): no cycles, and the
command line and the benchmarks are leaves that no library module reaches."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
Graph = dict[str, set[str]]


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The known modules `tree` imports anywhere in its body; `from a import b` counts as a.b when a.b is a module."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(p for p in (base, node.module) if p)
            found.update(f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names)
    return {name for name in found if name in known}


def import_graph(root: Path = SRC) -> Graph:
    files = {module_name(p, root): p for p in sorted((root / "deepship").rglob("*.py"))}
    return {name: imported_modules(ast.parse(path.read_text(encoding="utf-8")), name, path.name == "__init__.py",
                                   set(files)) - {name}
            for name, path in files.items()}


def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle per loop in `graph` (module -> modules it imports), each as [a, b, ..., a] in import order: find
    one, cut its closing edge, look again, until the graph sorts."""
    graph = {node: set(targets) for node, targets in graph.items()}
    cycles = []
    while True:
        try:
            graphlib.TopologicalSorter(graph).prepare()
            return cycles
        except graphlib.CycleError as exc:
            cycle = list(reversed(exc.args[1]))  # graphlib walks predecessors: reversed, it reads as imports
            cycles.append(cycle)
            graph[cycle[-2]].discard(cycle[-1])


def importers_of(graph: Graph, prefix: str) -> set[str]:
    """Modules outside `prefix` (a module or package) that import it or anything under it."""
    inside = lambda name: name == prefix or name.startswith(prefix + ".")  # noqa: E731
    return {src for src, targets in graph.items() if not inside(src) and any(inside(t) for t in targets)}


# ----------------------------------------------------------------------------------- the tools
def test_cycle_finder_on_hand_made_graphs() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []
    (cycle,) = find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert len(cycle) == 4 and cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    assert all(cycle[i + 1] in {"a": "b", "b": "c", "c": "a"}[cycle[i]] for i in range(3))  # follows the imports
    two = find_cycles({"a": {"b"}, "b": {"a"}, "x": {"y"}, "y": {"z"}, "z": {"x"}})
    assert sorted(sorted(set(c)) for c in two) == [["a", "b"], ["x", "y", "z"]]
    assert find_cycles({"a": {"a"}}) == [["a", "a"]]


def test_the_graph_reads_every_import_form(tmp_path: Path) -> None:
    pkg = tmp_path / "deepship"
    (pkg / "sub").mkdir(parents=True)
    sources = {
        "__init__.py": "",
        "cli.py": "def main():\n    from deepship.sub import leaf\n",
        "sub/__init__.py": "from . import leaf\n",
        "sub/leaf.py": "import os\nfrom ..cli import main\n",
        "other.py": "import deepship.sub.leaf as l\nfrom deepship.sub import nothing_here\nfrom deepship import cli\n",
    }
    for name, text in sources.items():
        (pkg / name).write_text(text)
    assert import_graph(tmp_path) == {
        "deepship": set(), "deepship.cli": {"deepship.sub.leaf"}, "deepship.sub": {"deepship.sub.leaf"},
        "deepship.sub.leaf": {"deepship.cli"}, "deepship.other": {"deepship.sub.leaf", "deepship.sub", "deepship.cli"}}
    assert importers_of(import_graph(tmp_path), "deepship.cli") == {"deepship.sub.leaf", "deepship.other"}


# ----------------------------------------------------------------------------------- the tree
def test_deepship_has_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 50  # the walk found the package
    cycles = find_cycles(graph)
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_only_the_entry_point_imports_the_command_line() -> None:
    assert importers_of(import_graph(), "deepship.cli") == set()


def test_only_the_command_line_imports_the_benchmarks() -> None:
    assert importers_of(import_graph(), "deepship.bench") <= {"deepship.cli"}
