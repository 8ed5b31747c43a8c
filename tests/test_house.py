"""House rules checked on the source: every module says what it owns; no module imports another's private names."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "spach"
MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_every_module_starts_with_a_docstring_saying_what_it_owns(path):
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree)
    assert doc and doc.splitlines()[0].strip(), f"{path} has no module docstring (first line: what it owns)"
    assert isinstance(tree.body[0], ast.Expr), f"{path}: the docstring must come first"


def private_imports(path: Path) -> list[str]:
    """`from spach.x import _name` (another module's private name) and `module._name` on an imported spach module."""
    tree = ast.parse(path.read_text())
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("spach"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            modules.update(a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("spach"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in modules:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_module_uses_another_modules_private_names(path):
    assert private_imports(path) == []


def test_the_private_name_finder_finds_both_forms(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('"""x."""\nfrom spach.battle.progress import _hidden\nimport spach.engine.checkpoint as ck\n'
                   'ck._secret()\nfrom spach.engine import checkpoint\ncheckpoint.LAST\n')
    assert private_imports(src) == ["line 2: from spach.battle.progress import _hidden", "line 4: ck._secret"]
