"""The floor plan holds: each room imports only the rooms before it, no import circles, no private names across
modules, no file over 600 lines (an AST walk of every import, module level and inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("core", "data_pipeline", "parallelism", "training", "launcher")
# room -> the rooms it may import (besides itself); the most specific room of a module applies
ALLOWED = {
    "core": set(),
    "data_pipeline": {"core"},
    "parallelism": {"core"},
    "training.model": {"core", "parallelism"},
    "training.checkpoint": {"core", "parallelism", "training.model"},
    "training.hf": {"core", "data_pipeline", "training.model", "training.checkpoint"},
    "training.inference": {"core", "data_pipeline", "training.model", "training.checkpoint"},
    "training": {"core", "data_pipeline", "parallelism", "training.model", "training.checkpoint", "training.hf"},
    "launcher": set(PACKAGES) | {"training.model", "training.checkpoint", "training.hf", "training.inference"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def room(name: str) -> str:
    return max((r for r in ALLOWED if name == r or name.startswith(r + ".")), key=len)


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported project module, names taken from it) for every import statement in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] not in PACKAGES:
                continue
            for a in node.names:  # `from training.model import names` imports the module training.model.names
                sub = f"{node.module}.{a.name}"
                out.append((sub, []) if sub in known else (node.module, [a.name]))
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m, _ in imports(path, known) if m in known and m != name} for name, path in known.items()}


def test_every_room_imports_only_the_rooms_before_it():
    known = modules()
    bad = []
    for name, path in known.items():
        for target, _ in imports(path, known):
            mine, theirs = room(name), room(target)
            if theirs != mine and theirs not in ALLOWED[mine]:
                bad.append(f"{name} imports {target}")
    assert bad == []


def find_cycles(g: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycles():
    g = graph()
    assert sum(len(v) for v in g.values()) > 100  # the walk sees the project's imports
    assert find_cycles(g) == []


def test_no_private_names_across_modules():
    known = modules()
    bad = [f"{name}: from {target} import {n}" for name, path in known.items()
           for target, names in imports(path, known) for n in names if n.startswith("_")]  # fmt: skip
    assert bad == []


def defined_names(path: Path) -> set[str]:
    """Names a module defines at its top level: functions, classes, assignments and its own imports."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def test_every_imported_name_exists_in_its_module():
    """Catches a lazy `from X import name` (inside a function) that a move left pointing at the wrong module."""
    known = modules()
    missing = [f"{name}: from {target} import {n}" for name, path in known.items()
               for target, names in imports(path, known) if target in known
               for n in names if n not in defined_names(known[target])]  # fmt: skip
    assert missing == []


def test_files_stay_small_and_training_top_level_stays_short():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {n: s for n, s in sizes.items() if s > 600} == {}
    top = sorted(p.name for p in (REPO / "training").glob("*.py"))
    assert len(top) <= 6, top


def test_the_checks_see_planted_faults(tmp_path):
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    a = tmp_path / "a.py"
    a.write_text("from core import errors\nimport launcher.cli\nfrom training.model.init import _secret\n")
    known = {"core.errors": a, "launcher.cli": a, "training.model.init": a}
    assert imports(a, known) == [("core.errors", []), ("launcher.cli", []), ("training.model.init", ["_secret"])]
    assert room("training.model.init") == "training.model" and room("training.trainer") == "training"
