"""The shape of the package: floors that imports only run down, no import cycles, modules and
functions of a readable size, callbacks of one concern each.

Imports are read with ``ast`` wherever they stand (module level or inside a function; only
``if TYPE_CHECKING:`` blocks are skipped), and importing ``a.b._c`` also imports the faces
``a.b`` and ``a`` (their ``__init__.py`` run first): an edge too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autonorm"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
MAX_CALLBACK_CODE_LINES = 150

#: The floors of the house, top first (``autonorm/__init__.py``, the face, stands on top). A
#: module imports from its own package or top-level module, or from a lower floor: never up.
FLOORS = [
    ["autonorm", "autonorm.cli"],
    ["autonorm.search"],
    ["autonorm.callbacks", "autonorm.report"],
    ["autonorm.recommendation", "autonorm.search_spaces", "autonorm.deploy"],
    ["autonorm.surgery"],
    ["autonorm.config"],
    ["autonorm._io"],
    ["autonorm.norms", "autonorm.budget", "autonorm._lightning"],
    ["autonorm._errors", "autonorm._trial_keys"],
]


def _modules(package: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """Imports under ``if TYPE_CHECKING:`` run only for type checkers."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for n in ast.walk(node)}
    return skipped


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules ``name`` imports, at module level or inside functions, with the package
    faces each import runs on the way."""
    tree = ast.parse(path.read_text())
    skipped = _type_checking_nodes(tree)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}
    faces = {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 1)}
    # a module's own package (and its ancestors) are imported with it: not an edge
    return {m for m in found | faces if m in modules and m != name and not name.startswith(m + ".")}


def _graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = _modules(package)
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _unit(module: str, floors: list[list[str]]) -> str:
    """The package or top-level module of the floor plan that ``module`` belongs to."""
    units = [u for floor in floors for u in floor if module == u or module.startswith(u + ".")]
    return max(units, key=len) if units else module


def _upward(graph: dict[str, set[str]], floors: list[list[str]]) -> list[str]:
    """Every import from a unit to another on the same or a higher floor."""
    level = {unit: i for i, floor in enumerate(floors) for unit in floor}
    bad = []
    for module, targets in sorted(graph.items()):
        mine = _unit(module, floors)
        for target in sorted(targets):
            theirs = _unit(target, floors)
            if theirs != mine and level[theirs] <= level[mine]:
                bad.append(f"{module} (floor {level[mine]}) -> {target} (floor {level[theirs]})")
    return bad


def _cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """One import path from ``start`` back to itself, if there is one."""
    stack = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, path = stack.pop()
        for nxt in graph.get(node, ()):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle_through(graph, "a") == ["a", "b", "c", "a"]
    assert _cycle_through(graph, "d") is None


def test_a_planted_upward_import_inside_a_function_is_caught(tmp_path: Path) -> None:
    """The budget -> callbacks shim import that once hid a cycle: inside a function, through
    the higher package's face."""
    pkg = tmp_path / "pkg"
    (pkg / "high").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "high" / "__init__.py").write_text("from pkg.high._impl import work\n")
    (pkg / "high" / "_impl.py").write_text("from pkg import low\n\ndef work():\n    return 1\n")
    (pkg / "low.py").write_text("def helper():\n    from pkg.high._impl import work\n")
    floors = [["pkg", "pkg.high"], ["pkg.low"]]
    graph = _graph(pkg)
    assert "pkg.high" in graph["pkg.low"]  # the face the import runs
    assert _upward(graph, floors) == [
        "pkg.low (floor 1) -> pkg.high (floor 0)",
        "pkg.low (floor 1) -> pkg.high._impl (floor 0)",
    ]
    cycle = _cycle_through(graph, "pkg.low")
    assert cycle is not None and cycle[0] == cycle[-1] == "pkg.low"


def test_every_module_stands_on_a_floor() -> None:
    placed = {unit for floor in FLOORS for unit in floor}
    units = {".".join(m.split(".")[:2]) for m in _modules(PACKAGE)}
    assert units == placed, f"place these on a floor: {sorted(units - placed)}"


def test_imports_run_down_the_floors() -> None:
    upward = _upward(_graph(), FLOORS)
    assert not upward, "imports that run up:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    graph = _graph()
    assert len(graph) > 10  # the walk saw the package
    cycles = [c for c in (_cycle_through(graph, m) for m in sorted(graph)) if c is not None]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_other_packages_import_through_a_package_face() -> None:
    """``autonorm.x._private`` is imported only from inside ``autonorm.x``."""
    reaching = []
    for module, targets in sorted(_graph().items()):
        for target in targets:
            parts = target.split(".")
            private = next((i for i, p in enumerate(parts) if p.startswith("_")), None)
            if private is not None and private > 1:
                owner = ".".join(parts[:private])
                if not (module == owner or module.startswith(owner + ".")):
                    reaching.append(f"{module} -> {target}")
    assert not reaching, "imports past a package's face:\n" + "\n".join(reaching)


def _why_long(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    doc = ast.get_docstring(node)
    return bool(doc and "long because" in doc.lower())


def _docstring_lines(node: ast.AST) -> set[int]:
    lines: set[int] = set()
    for inner in ast.walk(node):
        body = getattr(inner, "body", None)
        if isinstance(inner, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                assert first.end_lineno is not None
                lines |= set(range(first.lineno, first.end_lineno + 1))
    return lines


def _code_lines(node: ast.AST, source_lines: list[str]) -> int:
    """Lines of code without docstrings, comments and blank lines."""
    assert isinstance(node, ast.stmt) and node.end_lineno is not None
    docs = _docstring_lines(node)
    return sum(
        1
        for i in range(node.lineno, node.end_lineno + 1)
        if i not in docs
        and source_lines[i - 1].strip()
        and not source_lines[i - 1].lstrip().startswith("#")
    )


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_module_and_function_sizes(path: Path) -> None:
    source = path.read_text()
    lines = source.splitlines()
    assert len(lines) <= MAX_MODULE_LINES, f"{path} has {len(lines)} lines (> {MAX_MODULE_LINES})"
    long = [
        f"{node.name} ({_code_lines(node, lines)} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and _code_lines(node, lines) > MAX_FUNCTION_LINES
        and not _why_long(node)
    ]
    assert not long, f"{path}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_each_callback_class_is_small_and_its_hooks_have_no_mode_branch() -> None:
    classes = []
    for path in sorted((PACKAGE / "callbacks").glob("*.py")):
        source = path.read_text()
        for node in ast.parse(source).body:
            if isinstance(node, ast.ClassDef):
                classes.append(node.name)
                size = _code_lines(node, source.splitlines())
                assert size <= MAX_CALLBACK_CODE_LINES, f"{node.name}: {size} code lines"
                for method in node.body:
                    if isinstance(method, ast.FunctionDef) and method.name.startswith("on_"):
                        tests = [
                            ast.unparse(n.test)
                            for n in ast.walk(method)
                            if isinstance(n, (ast.If, ast.IfExp))
                        ]
                        assert not any("self.mode" in t or "self.trial" in t for t in tests), (
                            f"{node.name}.{method.name} branches on the mode"
                        )
    assert {"LearnNorms", "TrialNorms", "FixedNorms", "AutoNorm"} <= set(classes)
