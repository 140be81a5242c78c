"""The architecture as tests: no aggregation method is named outside `hlora.aggregation` (the import layers
are checked by `make lint`, lint-imports)."""

from __future__ import annotations

import ast
from pathlib import Path

from hlora.aggregation import registry

SRC = Path(__file__).resolve().parents[1] / "src" / "hlora"


def _method_names_in(path: Path, names: set[str]) -> list[tuple[int, str]]:
    """The string literals of `path` that are a method's name, less the package's own name where it is
    one ("hlora" for the logger, the command, the version record)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    allowed: set[int] = set()  # ids of string nodes that name the package, not the method
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("getLogger", "Typer"):
                allowed.update(id(a) for a in [*node.args, *(k.value for k in node.keywords)])
        if isinstance(node, ast.Dict):
            allowed.update(id(k) for k in node.keys if k is not None)
        first = node.elts[0] if isinstance(node, ast.List | ast.Tuple) and node.elts else None
        if isinstance(first, ast.Constant) and first.value == "hlora":  # ["hlora", *argv]: the command
            allowed.add(id(first))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in allowed
        and (node.value in names or ("," in node.value and set(node.value.split(",")) <= names))
    ]


def test_no_method_is_named_outside_aggregation():
    """Runtimes, the engine, compare, report, the bench and the CLI ask the registry (`ordered`,
    `reference`, the capabilities), so that a new method module is all a new method needs."""
    names = set(registry.names())
    found = {
        str(path.relative_to(SRC)): hits
        for path in sorted(SRC.rglob("*.py"))
        if "aggregation" not in path.relative_to(SRC).parts
        and (hits := _method_names_in(path, names))
    }
    assert found == {}


def test_the_check_sees_a_method_name(tmp_path):
    """The test above can fail: a comparison with a method's name is found; the logger's is not one."""
    probe = tmp_path / "probe.py"
    probe.write_text('log = getLogger("hlora")\nif method == "flexlora":\n    pass\n', encoding="utf-8")
    assert _method_names_in(probe, set(registry.names())) == [(2, "flexlora")]
