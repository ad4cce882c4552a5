"""The package's shape: no import circles, no import from a lower layer to a higher one, and
nothing done at import beyond what the user's guide promises."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "apt_model"

# Lower layers first. A module imports from its own layer and from lower ones, never from a
# higher one; the features of layer 1 do not import each other (``ops`` holds kernels any of
# them uses).
LAYERS = (
    {"env", "i18n", "errors", "accelerator", "storage", "argparsing", "figures"},
    {"ops", "modeling", "fp4", "vgpu"},
    {"optimization", "estimator"},
    {"training", "cli"},
)
FEATURES = 1
SHARED_IN_LAYER = {"ops"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """Every apt_model module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                     for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != "apt_model":
                found.add(name)
    return found


def own_packages(name: str) -> set[str]:
    """The packages above ``name`` (their ``__init__`` runs before it anyway)."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


GRAPH = {name: imported_modules(path) - {name} - own_packages(name)
         for name, path in MODULES.items() if name != "apt_model"}


def feature(name: str) -> str:
    return name.split(".")[1]


def layer(name: str) -> int:
    return next(i for i, group in enumerate(LAYERS) if feature(name) in group)


def test_every_module_has_a_layer():
    assert {feature(name) for name in GRAPH} <= set().union(*LAYERS)


def test_no_import_circles():
    cycles = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(GRAPH):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_no_import_runs_back_up_a_layer():
    wrong = []
    for name, targets in GRAPH.items():
        for target in targets:
            across_features = (layer(name) == layer(target) == FEATURES and feature(target) != feature(name)
                               and feature(target) not in SHARED_IN_LAYER)
            if layer(target) > layer(name) or across_features:
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if not (k.startswith("VB_") or k == "ENABLE_VIRTUAL_BLACKWELL")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**clean, "PYTHONPATH": str(ROOT), **env}, cwd=str(ROOT / "tests"))


@pytest.mark.parametrize("enabled", ["", "1"])
def test_import_loads_no_kernels_no_transformers_and_prints_nothing(enabled):
    code = ("import sys, apt_model\n"
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('triton', 'transformers', 'matplotlib')"
            " or m.startswith(('apt_model.fp4', 'apt_model.optimization.engine', 'apt_model.training'))]\n"
            "print(heavy)")
    proc = run_python(code, ENABLE_VIRTUAL_BLACKWELL=enabled)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[]\n" and proc.stderr == ""


def test_library_modules_print_nothing_on_import():
    names = sorted(name for name in MODULES if name != "apt_model.cli")
    code = "import importlib\n" + "".join(f"importlib.import_module({name!r})\n" for name in names)
    proc = run_python(code, ENABLE_VIRTUAL_BLACKWELL="1", VB_MODE="memory")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
