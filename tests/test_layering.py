"""The package's layering (README, Layout): each layer imports only layers below it, parts never each other.

Every import statement is read, those inside functions included, so a lazy import cannot
hide an upward or sideways dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "slicegpt_export"

#: layer of each top-level module or subpackage of slicegpt_export
LAYERS = {
    "errors": "model", "atomic": "model", "tensorio": "model", "device": "model", "checkpoint": "model", "modeling": "model",
    "gguf_spec": "model", "onnx_spec": "model", "hf_remote": "model",
    "sources": "sources",
    "converter": "converter", "exporters": "exporters", "validation": "validation",
    "pipeline": "top", "cli": "top", "__init__": "top",
}  # fmt: skip
#: which layers each layer may import
ALLOWED = {
    "model": {"model"},
    "sources": {"model", "sources"},
    "converter": {"model", "sources", "converter"},
    "exporters": {"model", "exporters"},
    "validation": {"model", "sources", "validation"},
    "top": {"model", "sources", "converter", "exporters", "validation", "top"},
}


def unit_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported_units(path: Path) -> set[str]:
    """The slicegpt_export units a module imports (TYPE_CHECKING-only imports included: they are still edges)."""
    units = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "slicegpt_export" and len(parts) > 1 and parts[1] in LAYERS:
                units.add(parts[1])
    return units


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_unit_has_a_layer():
    assert {unit_of(p) for p in MODULES} <= set(LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PACKAGE)) for p in MODULES])
def test_imports_go_down_only(path):
    layer = LAYERS[unit_of(path)]
    wrong = {u for u in imported_units(path) if LAYERS[u] not in ALLOWED[layer]}
    assert not wrong, f"{path.relative_to(PACKAGE)} ({layer}) imports {sorted(wrong)}"


def test_the_model_definition_needs_torch_alone():
    # it is copied beside every checkpoint as transformers remote code
    tree = ast.parse((PACKAGE / "modeling.py").read_text())
    runtime_imports = set()
    for node in tree.body:  # module level, outside `if TYPE_CHECKING:`
        if isinstance(node, ast.Import):
            runtime_imports |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            runtime_imports.add(node.module.split(".")[0])
    assert runtime_imports <= {"__future__", "dataclasses", "math", "typing", "torch"}, runtime_imports
