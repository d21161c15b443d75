"""The house's layers point one way (issue 14 §4): a module imports only from its own layer or below.

Layers, bottom to top (docs/architecture.md draws them):

0. ``base``: errors, utils, report (tables and pictures), families (the model families, their recipes and
   embedded names), and the digit world's CONTENT (vocabulary, renderer, oracle, committed assets): leaf
   modules every layer may use;
1. ``core``: the config schema, losses, update rules, THE loop, checkpoints, parallelism;
2. ``parts``: models (adapters), methods, data, evaluate (metrics), attacks, and the worlds' builders
   (base-model training, the class data set), which use models and data;
3. ``tasks``: what a run unlearns from and how it is scored in the run;
4. ``jobs``: the config resolution, the one run path, demos, leaderboard, study, bench, compare, eval;
5. ``cli``.

Module-level imports must point down or sideways. A function-level (lazy) import may point up only at
the plug points listed in LAZY_UP, each with its reason. Module-level imports have no cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

import diffunlearn

ROOT = Path(diffunlearn.__file__).parent
LAYERS = ("base", "core", "parts", "tasks", "jobs", "cli")
BASE = {"diffunlearn", "diffunlearn.errors", "diffunlearn.utils", "diffunlearn.report", "diffunlearn.families",
        "diffunlearn.worlds", "diffunlearn.worlds.digits", "diffunlearn.worlds.oracle", "diffunlearn.worlds.assets",
        "diffunlearn.models.assets"}
# Function-level imports that point up, and why each is allowed.
LAZY_UP: dict[tuple[str, str], str] = {}


def module_names() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("diffunlearn", *path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def layer(module: str) -> int:
    if module in BASE:
        return 0
    top = module.split(".")[1] if "." in module else ""
    by_folder = {"core": 1, "models": 2, "methods": 2, "data": 2, "evaluate": 2, "attacks": 2, "worlds": 2,
                 "tasks": 3, "jobs": 4}
    if top in by_folder:
        return by_folder[top]
    return {"config": 4, "cli": 5}[top]


def imports(modules: dict[str, Path]) -> list[tuple[str, str, bool]]:
    """(importer, imported module, at module level) for every import of a diffunlearn module."""
    found = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        top_level = {id(n) for n in tree.body}
        top_level |= {id(n) for block in tree.body if isinstance(block, (ast.If, ast.Try))
                      for n in block.body}
        type_checking = {id(n) for n in ast.walk(tree) if isinstance(n, ast.If)
                         and isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING" for n in n.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if id(node) in type_checking:
                    continue
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parts = parts[:len(parts) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                if not base.startswith("diffunlearn"):
                    continue
                for alias in node.names:
                    target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    found.append((name, target, id(node) in top_level))
    return found


def test_no_module_imports_a_higher_layer():
    modules = module_names()
    up = [(a, b, top) for a, b, top in imports(modules) if layer(b) > layer(a)]
    eager = [f"{a} -> {b}" for a, b, top in up if top]
    assert eager == [], "module-level imports of a higher layer:\n" + "\n".join(eager)
    lazy = sorted({f"{a} -> {b}" for a, b, top in up if not top and (a, b) not in LAZY_UP})
    assert lazy == [], "function-level imports of a higher layer outside LAZY_UP:\n" + "\n".join(lazy)


def test_module_level_imports_have_no_cycle():
    modules = module_names()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for a, b, top in imports(modules):
        if top and a != b and b in graph:
            graph[a].add(b)
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
                return True
            if nxt not in state and visit(nxt, stack + [nxt]):
                return True
        state[node] = 2
        return False

    for m in sorted(graph):
        if m not in state and visit(m, [m]):
            break
    assert cycle == [], "import cycle: " + " -> ".join(cycle)


def test_the_layer_map_knows_every_module_and_the_checker_sees_upward_imports():
    modules = module_names()
    assert all(layer(m) in range(len(LAYERS)) for m in modules)
    assert layer("diffunlearn.core.training") == 1 and layer("diffunlearn.jobs.run") == 4
    # The checker itself: cli imports jobs lazily (down, fine); a core module importing methods would be up.
    edges = imports(modules)
    assert ("diffunlearn.cli", "diffunlearn.jobs.run", False) in edges
    assert layer("diffunlearn.methods.base") > layer("diffunlearn.core.training")
