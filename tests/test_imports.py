"""The package's layers: every import of the project's own modules goes down, never up, and
no two parts import each other (the "Layers" paragraph of docs/training.md).

The imports are read from the source with ``ast`` (nothing is imported): module-level
imports and the ones inside functions alike, since an import moved into a function still
ties its module to the other one. A part is a subpackage (``deferredseg.train``,
``deferredseg.review``, ...) or a top-level module (``deferredseg.predict``, ...);
imports inside one part are that part's own business.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("deferredseg", "deferredseg_kernels")

#: The parts from the bottom up; a part may import the parts of the layers below its own
#: (and parts of its own layer, as long as no cycle forms), never those above.
LAYERS: Tuple[Tuple[str, ...], ...] = (
    # the tensor ops
    ("deferredseg_kernels",),
    # what needs nothing of the package: files written atomically, per-image scores, stats
    ("deferredseg.fileio", "deferredseg._docgen", "deferredseg.scores", "deferredseg.stats"),
    # the deferral policy, then what measures and trains with it
    ("deferredseg.policy",),
    ("deferredseg", "deferredseg.losses", "deferredseg.metrics"),
    # the building blocks of training: experts, data, networks
    ("deferredseg.experts",),
    ("deferredseg.data", "deferredseg.models"),
    # training and evaluation; loading a trained model and choosing a device
    # (deferredseg.train.runtime); deferral added to a trained network (its code is
    # deferredseg.train.bolt_on: training's evaluation reads its checkpoints)
    ("deferredseg.train",),
    ("deferredseg.bolt_on",),
    # a checkpoint's labels and routing for new images
    ("deferredseg.predict",),
    # the review folder: predict's outputs, tasks, database, manifest, server, merge
    ("deferredseg.review",),
    # the demos and the command line
    ("deferredseg.demo", "deferredseg.backends_demo"),
    ("deferredseg.cli",),
    ("deferredseg.__main__",),
)

LAYER_OF: Dict[str, int] = {part: i for i, layer in enumerate(LAYERS) for part in layer}


def _module_files() -> Iterator[Tuple[str, Path]]:
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


def part_of(module: str) -> str:
    """The part a module belongs to: its subpackage of ``deferredseg`` (``deferredseg.train``
    for ``deferredseg.train.loop``), or the top-level module itself (``deferredseg.predict``,
    and ``deferredseg`` for the package's ``__init__``); all of ``deferredseg_kernels`` is
    one part."""
    names = module.split(".")
    if names[0] != "deferredseg" or len(names) == 1:
        return names[0]
    return ".".join(names[:2])


def imports_of(module: str, path: Path, is_package: bool) -> Iterator[Tuple[str, int, str]]:
    """``(imported module, line, where)`` for every import of the project's own modules in
    ``path``, at module level or inside a function (``where``: "module" or the function)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, where: str) -> Iterator[Tuple[str, int, str]]:
        for child in ast.iter_child_nodes(node):
            inner = where
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = f"function {child.name}"
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, child.lineno, where
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if child.module is None:  # from . import x: x is a module of the package
                    for alias in child.names:
                        yield f"{target}.{alias.name}", child.lineno, where
                else:
                    yield target, child.lineno, where
            yield from visit(child, inner)

    for target, line, where in visit(tree, "module"):
        if target.split(".")[0] in PACKAGES:
            yield target, line, where


def import_graph() -> Dict[Tuple[str, str], List[str]]:
    """``(importing part, imported part)`` -> where (``module:line (where)``), for the imports
    between two different parts."""
    edges: Dict[Tuple[str, str], List[str]] = {}
    for module, path in _module_files():
        src = part_of(module)
        for target, line, where in imports_of(module, path, path.name == "__init__.py"):
            dst = part_of(target)
            if dst != src:
                edges.setdefault((src, dst), []).append(f"{module}:{line} ({where})")
    return edges


def find_cycle(edges: Dict[Tuple[str, str], List[str]]) -> Optional[List[str]]:
    """A cycle of parts (first part repeated at the end), or None."""
    graph: Dict[str, List[str]] = {}
    for src, dst in sorted(edges):
        graph.setdefault(src, []).append(dst)
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def dfs(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def _describe(cycle: List[str], edges: Dict[Tuple[str, str], List[str]]) -> str:
    steps = [f"  {a} -> {b}: {', '.join(edges[(a, b)][:3])}" for a, b in zip(cycle, cycle[1:])]
    return "import cycle " + " -> ".join(cycle) + "\n" + "\n".join(steps)


def test_the_walker_sees_function_level_and_relative_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "import os\n"
        "from . import policy\n"
        "from .train.config import TrainConfig\n"
        "def f():\n"
        "    from ..review import db\n"
        "    import deferredseg_kernels.ops\n"
    )
    got = list(imports_of("deferredseg.data.files", src, is_package=False))
    assert got == [
        ("deferredseg.data.policy", 2, "module"),
        ("deferredseg.data.train.config", 3, "module"),
        ("deferredseg.review", 5, "function f"),
        ("deferredseg_kernels.ops", 6, "function f"),
    ]
    edges = {("a", "b"): ["a.x:1 (module)"], ("b", "c"): ["b:2 (function g)"]}
    assert find_cycle(edges) is None
    edges[("c", "a")] = ["c.y:3 (function h)"]
    cycle = find_cycle(edges)
    assert cycle == ["a", "b", "c", "a"]
    assert "c.y:3 (function h)" in _describe(cycle, edges)


def test_every_part_has_a_layer():
    parts = {part_of(module) for module, _ in _module_files()}
    assert parts - set(LAYER_OF) == set(), "add the new part to LAYERS (and docs/training.md)"
    assert set(LAYER_OF) - parts == set(), "LAYERS names a part that no longer exists"


def test_no_import_cycle_between_parts():
    edges = import_graph()
    cycle = find_cycle(edges)
    assert cycle is None, _describe(cycle, edges)


@pytest.mark.parametrize("layer", range(len(LAYERS)), ids=lambda i: " ".join(LAYERS[i]))
def test_imports_go_down_the_layers(layer):
    upward = [
        f"{src} (layer {LAYER_OF[src]}) imports {dst} (layer {LAYER_OF[dst]}): "
        + ", ".join(where[:3])
        for (src, dst), where in sorted(import_graph().items())
        if src in LAYERS[layer] and LAYER_OF.get(dst, -1) > LAYER_OF[src]
    ]
    assert not upward, "\n".join(upward)
