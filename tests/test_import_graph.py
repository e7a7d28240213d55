"""The house's dependency direction, read from the source with ast: launcher -> wings -> core, nothing sideways.

Wings: training, evaluation, serving, collection, cluster. The launcher may import every package; a wing imports
core (and itself) only; core imports no wing. No import cycle between modules, lazy imports included (an import
inside a function is still a dependency).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WINGS = ("training", "evaluation", "serving", "collection", "cluster")
PACKAGES = ("launcher", "core", *WINGS)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every project module this file imports, at the top or inside functions."""
    found = set()
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package upward
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base
                                                                                                   else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PACKAGES}
    return found


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES if (ROOT / package).is_dir()
            for p in (ROOT / package).rglob("*.py")}


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    edges = {}
    for name, path in modules.items():
        # "from core import storage" names the module core.storage; "from core.x import f" names core.x
        edges[name] = {n for n in imports_of(path) if n in modules and n != name}
    return edges


def direction_problems(edges: dict[str, set[str]]) -> list[str]:
    """Imports that go sideways between wings or upward (a wing into the launcher, core into anything else)."""
    problems = []
    for module, targets in edges.items():
        top = module.split(".")[0]
        for target in sorted(targets):
            other = target.split(".")[0]
            if top == "core" and other != "core":
                problems.append(f"{module} (core) imports {target}")
            elif top in WINGS and other not in (top, "core"):
                problems.append(f"{module} ({top}) imports {target} ({other})")
    return problems


def cycles_in(edges: dict[str, set[str]]) -> list[str]:
    """Each import cycle found by a depth-first walk, as 'a -> b -> a'."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return cycles


def test_no_wing_imports_sideways_or_upward_and_core_imports_no_wing():
    problems = direction_problems(graph())
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    cycles = cycles_in(graph())
    assert not cycles, "\n".join(cycles)


def test_the_checks_catch_a_cycle_and_an_upward_import():
    # the shapes the house had before: formats and source importing each other; a wing reaching into the launcher
    planted = {"core.data.formats": {"core.data.source"}, "core.data.source": {"core.data.formats"},
               "training.loop": {"launcher.recipe", "core.data.source", "evaluation.report"},
               "core.models": {"training.loop"}, "launcher.cli": {"training.loop"}}
    assert cycles_in(planted) == ["core.data.formats -> core.data.source -> core.data.formats"]
    assert direction_problems(planted) == ["training.loop (training) imports evaluation.report (evaluation)",
                                           "training.loop (training) imports launcher.recipe (launcher)",
                                           "core.models (core) imports training.loop"]


def test_the_check_sees_imports_inside_functions():
    # the graph is read from every import statement, lazy ones included: the driver's reference stage import
    assert "training.reference" in graph()["training.driver"]
