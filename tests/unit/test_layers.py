"""The picture of the imports: the library (glmfleet/) stands on nothing of glmfleet's, the roles
on the library, the commands (glmfleet_cli/, deploy.py) on both; nothing imports upward and no
module takes part in an import circle. Read from the source, as the modules are written."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support.paths import ROOT

LAYERS = {"glmfleet": 0, "roles": 1, "glmfleet_cli": 2, "deploy": 2, "devfleet": 2}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in it, functions included)."""
    files = [
        ROOT / "deploy.py",
        *[
            path
            for package in ("glmfleet", "roles", "glmfleet_cli", "devfleet")
            for path in (ROOT / package).rglob("*.py")
        ],
    ]
    modules = {module_name(path): path for path in files}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                candidates = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            found |= {candidate for candidate in candidates if candidate in modules and candidate != name}
        graph[name] = found
    return graph


def layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def test_nothing_imports_a_higher_layer():
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in imports().items()
        for target in targets
        if layer(target) > layer(module)
    )
    assert upward == []


def test_no_module_is_in_an_import_circle():
    graph = imports()
    circles = []

    def visit(module, path):
        for target in graph[module]:
            if target in path:
                circles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in seen:
                visit(target, path + [target])
        seen.add(module)

    seen: set[str] = set()
    for module in sorted(graph):
        if module not in seen:
            visit(module, [module])
    assert circles == []


def test_the_library_does_not_know_the_roles_or_the_commands():
    assert not [
        target
        for module, targets in imports().items()
        if layer(module) == 0
        for target in targets
        if layer(target) != 0
    ]
