"""Size limits that keep the package readable: modules of at most 600 lines, functions of at most 80."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "geoseg"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def modules() -> list[Path]:
    found = sorted(PACKAGE.rglob("*.py"))
    assert len(found) > 20, f"no package found at {PACKAGE}"
    return found


def functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, f"{prefix}{node.name}.")
        else:
            yield from functions(node, prefix)


def test_modules_are_at_most_600_lines():
    long = {}
    for path in modules():
        n = len(path.read_text().splitlines())
        if n > MAX_MODULE_LINES:
            long[str(path.relative_to(PACKAGE.parent))] = n
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them): {long}"


def test_functions_are_at_most_80_lines():
    long = {}
    for path in modules():
        for name, node in functions(ast.parse(path.read_text(), filename=str(path))):
            n = node.end_lineno - node.lineno + 1  # from ``def`` to the last line of the body
            if n > MAX_FUNCTION_LINES:
                long[f"{path.relative_to(PACKAGE.parent)}::{name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them): {long}"
