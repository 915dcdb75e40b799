"""The size rules of DESIGN's "Layout" (issue 11): no module in proxy/ over 600 lines
and no function over 60, unless its docstring says why ("long because ...")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.pure

PROXY = Path(__file__).resolve().parent.parent / "proxy"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60
EXCUSE = "long because"  # what a docstring says to be allowed over the limit


def _modules() -> list[Path]:
    return sorted(PROXY.rglob("*.py"))


def _excused(node: ast.AST) -> bool:
    doc = ast.get_docstring(node)  # type: ignore[arg-type]
    return doc is not None and EXCUSE in doc.lower()


def test_there_are_modules_to_check() -> None:
    """The rules below look at the package (a wrong path would make them pass vacuously)."""
    assert len(_modules()) > 100


def test_no_module_over_600_lines() -> None:
    """Every module in proxy/ is at most 600 lines, or its docstring says why."""
    over = []
    for path in _modules():
        source = path.read_text(encoding="utf-8")
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES and not _excused(ast.parse(source)):
            over.append(f"{path.relative_to(PROXY.parent)}: {lines} lines")
    assert over == []


def test_no_function_over_60_lines() -> None:
    """Every function and method in proxy/ is at most 60 lines (decorators not counted),
    or its docstring says why."""
    over = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            assert node.end_lineno is not None
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES and not _excused(node):
                over.append(f"{path.relative_to(PROXY.parent)}:{node.lineno} {node.name}: "
                            f"{lines} lines")
    assert over == []
