"""The package's shape, checked from its source: modules stay small, no private name crosses a module
boundary, and imports follow the data flow (io -> model -> quant -> formats -> eval; the ladder orchestrates
them; the CLI wires them)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "quantkit"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 350
# Longer modules, each one coherent thing, with the reason it stays whole.
LONGER = {
    "cli.py": "one click command per verb, their options and help text",
}
# What each layer may import from the package (besides itself, errors and the version).
MAY_IMPORT = {
    "io": set(),
    "model": {"io"},
    "quant": {"io", "model", "formats"},  # the drivers write artifacts through formats
    "formats": {"io", "model", "quant"},  # encoders take quantized weights (quant.primitives)
    "eval": {"io", "model", "quant", "formats"},
    "ladder": {"io", "model", "quant", "formats", "eval"},  # orchestration: makes, scores and reports files
    "cli": {"io", "model", "quant", "formats", "eval", "ladder"},
}
# The vocabulary every layer shares: a quantized weight's spec, codes and scales (read back by io).
SHARED = {"quantkit.quant.primitives"}


def _name(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def _layer(module: str) -> str | None:
    """'quantkit.io.config' -> 'io'; 'quantkit.model' -> 'model'; errors and the package itself -> None."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in ("errors", "__init__"):
        return None
    return parts[0]


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every ``from quantkit... import`` in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "quantkit":
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "quantkit"]
    return found


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_module_is_small(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES or _name(path) in LONGER, f"{_name(path)} has {n} lines (over {MAX_LINES})"


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_no_private_name_crosses_modules(path):
    private = [(m, n) for m, names in _imports(path) for n in names if n.startswith("_") and n != "__version__"]
    assert not private, f"{_name(path)} imports private names {private}"


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_imports_follow_the_data_flow(path):
    own = _layer("quantkit." + _name(path).removesuffix(".py").replace("/", "."))
    if own is None:
        return
    allowed = MAY_IMPORT[own] | {own}
    wrong = [m for m, _ in _imports(path) if _layer(m) not in allowed | {None} and m not in SHARED]
    assert not wrong, f"{_name(path)} ({own}) imports {wrong}"


def test_the_checks_see_the_whole_package():
    """Guards the three checks above against passing on an empty or misread tree."""
    layers = {_layer("quantkit." + _name(p).removesuffix(".py").replace("/", ".")) for p in MODULES}
    assert {"io", "model", "quant", "formats", "eval", "ladder", "cli"} <= layers
    assert sum(len(_imports(p)) for p in MODULES) > 50
