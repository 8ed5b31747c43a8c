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


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MAX_FUNCTION_LINES = 80


SHORT_FUNCTION_MODULES = ("engine", "battle", "bench.py")  # packages and top-level modules under the rule


def test_engine_battle_and_bench_functions_fit_on_one_screen():
    long = []
    for path in MODULES:
        if path.parent.name not in SHORT_FUNCTION_MODULES and path.name not in SHORT_FUNCTION_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over ~80 lines:\n" + "\n".join(long)


def test_comments_point_to_documents_in_the_repository():
    # the specification lives outside the repository; the code points to docs/design.md, the README, docs/battle.md
    stale = [str(p.relative_to(PACKAGE.parent)) for p in MODULES if "SPEC §" in p.read_text()]
    assert not stale, f"comments refer to SPEC, a file not in the repository: {stale}"


LAYER_RANK = {"io": 0, "runtime": 0, "errors": 0, "rng": 0, "accelerators": 0, "yaml_file": 0, "models": 1,
              "data": 2, "engine": 3, "analysis": 4, "bench": 4, "timing": 4, "export": 4, "battle": 5, "cli": 6}


def upward_imports(path: Path, name: str | None = None) -> list[str]:
    """Imports in `path` (module `name`, by default its place under spach/) of a layer above its own."""
    name = name or module_name(path)
    parts = name.split(".")
    if len(parts) < 2 or parts[1] not in LAYER_RANK:
        return []
    mine, offences = LAYER_RANK[parts[1]], []
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for target in targets:
            tparts = target.split(".")
            if tparts[0] == "spach" and len(tparts) > 1 and LAYER_RANK.get(tparts[1], -1) > mine:
                offences.append(f"{name} imports {target}")
    return offences


def test_lower_layers_never_import_higher_ones():
    offences = [o for path in MODULES for o in upward_imports(path)]
    assert not offences, "\n".join(offences)


def test_every_top_level_module_and_package_has_a_layer_rank():
    top = {p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    top |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert sorted(top - set(LAYER_RANK)) == [], "give each a rank in LAYER_RANK (the import check skips it)"


def test_the_layer_check_finds_an_upward_import(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('"""x."""\nimport spach.models\nfrom spach.battle import db\nfrom spach.engine.train import fit\n')
    assert upward_imports(src, "spach.engine.m") == ["spach.engine.m imports spach.battle"]
    assert upward_imports(src, "spach.cli.m") == []


def package_imports(path: Path, name: str | None = None) -> set[str]:
    """The modules of its own package that the module at ``path`` (named ``name``) imports, at any depth of
    its code (module level and inside functions); a package's ``__init__`` is the package's own name."""
    name = name or module_name(path)
    is_init = path.name == "__init__.py"
    package = name if is_init else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per extra dot
                parts = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from pkg import name` the package itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in KNOWN_MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in KNOWN_MODULES:
                target = target.rpartition(".")[0]  # import a.b.c of a module a.b.c or its package
            in_package = target == package or target.rpartition(".")[0] == package
            if target and target != name and in_package:
                found.add(target)
    return found


KNOWN_MODULES = {module_name(p) for p in MODULES}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` per strongly connected group of modules that import each other (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for group in groups:  # a path from the group's first module back to itself, inside the group
        start = min(group)
        path, seen = [start], {start}
        while True:
            nxt = sorted(w for w in graph[path[-1]] if w in group)
            back = start if start in nxt else next((w for w in nxt if w not in seen), None)
            if back is None:
                back = nxt[0]
            path.append(back)
            if back == start or back in seen:
                cycles.append(path[path.index(back):])
                break
            seen.add(back)
    return sorted(cycles)


def test_no_package_has_an_import_loop():
    graph = {module_name(p): package_imports(p) for p in MODULES}
    cycles = import_cycles(graph)
    assert not cycles, "import loops inside a package (move the shared piece to the lower module):\n" + "\n".join(
        " -> ".join(c) for c in cycles)


def test_the_import_loop_check_finds_loops_at_any_depth(tmp_path):
    (tmp_path / "pkg").mkdir()
    files = {"__init__.py": "from spach.models import a\n", "a.py": "import spach.models.b as b\n",
             "b.py": "def f():\n    from . import c\n", "c.py": "from .a import x\n", "d.py": "from spach.models import b\n"}
    for file, text in files.items():
        (tmp_path / "pkg" / file).write_text(text)
    global KNOWN_MODULES
    saved, KNOWN_MODULES = KNOWN_MODULES, {"spach.models", "spach.models.a", "spach.models.b", "spach.models.c",
                                           "spach.models.d", "spach.io"}
    try:
        graph = {("spach.models" if f == "__init__.py" else f"spach.models.{f[:-3]}"):
                 package_imports(tmp_path / "pkg" / f, "spach.models" if f == "__init__.py" else
                                 f"spach.models.{f[:-3]}") for f in files}
    finally:
        KNOWN_MODULES = saved
    assert graph["spach.models.b"] == {"spach.models.c"}  # inside a function, relative
    assert import_cycles(graph) == [["spach.models.a", "spach.models.b", "spach.models.c", "spach.models.a"]]
    assert import_cycles({"x": {"y"}, "y": set()}) == []
