"""The project's layers, read from its imports (every import, at any depth: an import tucked
inside a function counts like any other):

    app.tools                   the command line and what it runs
    clients, server             the Flower apps
    app.learn                   the LightningModule, state policy, diagnostics, process caches
    app.nn, app.data, rundir    models; datasets and partitions; the run directory's format
    app.config                  the validated config (no torch)
    app.errors

A module imports from its own room or from rooms below it, never above or beside, and no two
modules import each other, directly or around a loop."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from helpers import REPO

from app import config
from app.nn import models, norms

PACKAGES = ("app", "clients", "server")
ROOMS = {  # room -> level
    "app.errors": 0,
    "app.config": 1,
    "app.rundir": 2,
    "app.nn": 2,
    "app.data": 2,
    "app.learn": 3,
    "clients": 4,
    "server": 4,
    "app.tools": 5,
}


def project_modules() -> dict[str, ast.Module]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = ast.parse(path.read_text(), str(path))
    return modules


MODULES = project_modules()


def imports_of(name: str, tree: ast.Module) -> set[str]:
    """The project modules ``name`` imports, anywhere in its body."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.split(".")[: -node.level] if node.level else []
                base = ".".join([*package, base] if base else package)
            # ``from pkg import mod`` imports pkg.mod; ``from mod import name`` imports mod
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(name, tree) for name, tree in MODULES.items()}


def room(module: str) -> str | None:
    matches = [r for r in ROOMS if module == r or module.startswith(r + ".")]
    return max(matches, key=len) if matches else None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_the_projects_modules():
    assert len(MODULES) > 30  # the walk found the project
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


def test_every_module_lives_in_a_room_and_imports_only_downwards():
    wrong = []
    for module, targets in GRAPH.items():
        if module in PACKAGES:  # the empty top-level package files
            continue
        here = room(module)
        assert here is not None, f"{module} is in no room of {sorted(ROOMS)}"
        for target in targets:
            there = room(target)
            if there is None or (there != here and ROOMS[there] >= ROOMS[here]):
                wrong.append(f"{module} ({here}) imports {target} ({there})")
    assert not wrong, "\n".join(wrong)


def test_layers_know_nothing_of_the_models_built_from_them():
    assert not GRAPH["app.nn.layers"] & {"app.nn.norms", "app.nn.models"}
    assert "app.nn.models" not in GRAPH["app.nn.norms"]


def test_reading_a_config_imports_neither_torch_nor_the_registries():
    probe = (
        "import sys, app.config; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy') "
        "or m.startswith('app.nn')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("names", "registry"),
    [(config.ARCHS, tuple(models.MODELS)), (config.NORMS, norms.NORMS)],
    ids=["archs", "norms"],
)
def test_config_names_are_exactly_the_registries_keys(names, registry):
    assert names == registry
