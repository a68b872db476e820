"""The package's layout is its architecture: imports run one way, tools -> app -> drafters / backends -> core."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "specsweep"
# what each layer may import from specsweep (besides itself and the shared errors, files and CONF_DIR)
ALLOWED = {
    "core": set(),
    "backends": {"core"},
    "drafters": {"core", "backends"},
    "evaluation": set(),
    "app": {"core", "backends", "drafters", "evaluation"},
    "tools": {"core", "backends", "drafters", "evaluation", "app"},
    "__main__": {"app"},
}
SHARED = {"errors", "files", ""}  # specsweep.errors, specsweep.files, `from specsweep import CONF_DIR`


def specsweep_imports(path: Path) -> set[str]:
    """The first component under specsweep of every module ``path`` imports (at any depth)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        for name in names:
            if name == "specsweep" or name.startswith("specsweep."):
                found.add(name.removeprefix("specsweep").removeprefix(".").split(".")[0])
    return found


def layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path):
    layer = layer_of(path)
    if layer in SHARED or layer == "__init__":
        assert specsweep_imports(path) <= SHARED, "the shared modules import no layer"
        return
    assert layer in ALLOWED, f"{layer}: a new top-level module or package; give it a layer in ALLOWED"
    wrong = specsweep_imports(path) - ALLOWED[layer] - SHARED - {layer}
    assert not wrong, f"{path.relative_to(PACKAGE)} ({layer}) imports {sorted(wrong)}"


def test_the_config_tree_ships_inside_the_package():
    from specsweep import CONF_DIR

    assert CONF_DIR.parent == PACKAGE and (CONF_DIR / "config.yaml").is_file()


@pytest.mark.parametrize("layer", ["core", "backends"])
def test_the_decode_path_keeps_no_state_in_modules(layer):
    """What a forward needs travels with it (e.g. row_invariant attention's plan of the mask): no
    module of the decoding core or the backends rebinds a module-level name."""
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        rebinding = [node.lineno for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Global)]
        assert not rebinding, f"{path.relative_to(PACKAGE)}: `global` at line(s) {rebinding}"
