"""No function in the runtime packages (tpdm_rl/, rollout/, rewards/; the builders of test and demo models apart)
is longer than 80 lines: a longer one is split into named steps."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tpdm_rl", "rollout", "rewards")
EXEMPT = (ROOT / "tpdm_rl" / "builders",)
MAX_LINES = 80


def long_functions(path: Path, limit: int = MAX_LINES) -> list[str]:
    """``file:line name (N lines)`` for every function or method of ``path`` longer than ``limit`` lines
    (decorators and docstring included)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            n = node.end_lineno - first + 1
            if n > limit:
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
                out.append(f"{where}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_over_80_lines():
    files = [f for pkg in PACKAGES for f in sorted((ROOT / pkg).rglob("*.py"))
             if not any(f.is_relative_to(e) for e in EXEMPT)]
    assert len(files) > 50  # the walk found the packages
    bad = [line for f in files for line in long_functions(f)]
    assert not bad, "split these functions:\n" + "\n".join(bad)


def test_the_length_check_sees_a_long_function(tmp_path):
    f = tmp_path / "probe.py"
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_LINES))
    f.write_text(f"class A:\n    @staticmethod\n    def g():\n{body}\n")
    assert long_functions(f) == [f"probe.py:3 g ({MAX_LINES + 2} lines)"]  # the decorator counts
    assert long_functions(f, MAX_LINES + 2) == []
