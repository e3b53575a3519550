"""DESIGN.md's layering, checked on the source: a module imports only from rooms below it.

Every `import miaotui.X` / `from miaotui.X import` statement in the package is read with `ast`
(including imports inside functions, which are still dependencies), so a new upward import or a
circle fails here instead of in review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import miaotui

PACKAGE = Path(miaotui.__file__).parent

# room -> rooms it must never import (the rooms above it, and the front ends).
FORBIDDEN = {
    "runner": ("miaotui.engine", "miaotui.server", "miaotui.cli", "miaotui.llm"),
    "engine": ("miaotui.server", "miaotui.cli", "miaotui.llm"),
    "sample": ("miaotui.engine", "miaotui.runner", "miaotui.server", "miaotui.cli"),
    "models": ("miaotui.engine", "miaotui.runner", "miaotui.server", "miaotui.cli"),
    "layers": ("miaotui.engine", "miaotui.runner", "miaotui.models", "miaotui.server", "miaotui.cli"),
    "loader": ("miaotui.engine", "miaotui.runner", "miaotui.server", "miaotui.cli"),
    "server": ("miaotui.cli",),
}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return [n for n in names if n == "miaotui" or n.startswith("miaotui.")]


def test_no_module_imports_a_room_above_it() -> None:
    violations = []
    for room, forbidden in FORBIDDEN.items():
        files = sorted((PACKAGE / room).rglob("*.py"))
        assert files, f"room {room} has no modules: the table above is stale"
        for path in files:
            for name in _imports(path):
                if any(name == f or name.startswith(f + ".") for f in forbidden):
                    violations.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not violations, "imports against the layering:\n" + "\n".join(violations)


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    # The check must be able to fail: a lazy upward import is still found.
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from miaotui.cli import main\n    import miaotui.engine.scheduler\n")
    assert _imports(probe) == ["miaotui.cli", "miaotui.engine.scheduler"]
