"""The package layout keeps its promises: layers point down, no import cycles, small modules.

`lint-imports` (the contracts in pyproject.toml) enforces the same in CI; this test reads the
imports itself with `ast`, so it runs wherever pytest does and shows the offending edge.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "accumlab"
MAX_LINES = 450
# a layer may import its own package and any layer below it
RANK = {"engine": 0, "data": 1, "lab": 2, "doctor": 2, "integrations": 2, "cli": 3, "ui": 3}
TOP = max(RANK.values())
SIBLINGS_APART = [{"lab", "doctor", "integrations"}, {"cli", "ui"}]
UI_ONLY = ("ipywidgets", "plotly", "anywidget")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (lazy imports inside functions included)."""
    tree = ast.parse(path.read_text())
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    return found


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: {i for i in _imports(p) if i in MODULES and i != name}
         for name, p in MODULES.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_small(name):
    n = len(MODULES[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{name} has {n} lines: split it along its seams (limit {MAX_LINES})"


def test_every_module_lives_in_a_layer():
    loose = [m for m in MODULES if m != "accumlab" and _layer(m) is None]
    assert not loose, f"modules outside the layer packages: {loose}"


def wrong_way_imports(graph: dict[str, set[str]]) -> list[str]:
    """Edges that point up a layer, across independent siblings, or into the public face."""
    wrong = []
    for src, targets in graph.items():
        a = _layer(src)
        if a is None:  # accumlab/__init__.py: the public face may import any layer
            continue
        for dst in sorted(targets):
            b = _layer(dst)
            if b is None:  # only the top layer may use the face, which pulls in every layer
                if RANK[a] < TOP:
                    wrong.append(f"{src} -> {dst} (the top-level face pulls in every layer)")
            elif RANK[b] > RANK[a] or (a != b and any({a, b} <= s for s in SIBLINGS_APART)):
                wrong.append(f"{src} -> {dst}")
    return wrong


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None. A package's __init__ importing its own
    modules (re-exports) is not counted."""
    edges = {n: {t for t in ts if not t.startswith(n + ".")} for n, ts in graph.items()}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(edges):
        if name not in state:
            found = visit(name)
            if found:
                return found
    return None


def test_layers_point_down():
    wrong = wrong_way_imports(GRAPH)
    assert not wrong, "imports that point up or across:\n" + "\n".join(wrong)


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_the_ui_imports_widgets_or_plotly():
    wrong = [f"{name} imports {i}" for name, p in MODULES.items() if _layer(name) != "ui"
             for i in _imports(p) if i.split(".")[0] in UI_ONLY]
    assert not wrong, "\n".join(wrong)


def test_the_checks_can_fail():
    """The two rules catch what they should on a made-up graph."""
    fake = {"accumlab.engine.a": {"accumlab.lab.b"}, "accumlab.data.f": {"accumlab"}, "accumlab.lab.b": {"accumlab.doctor.c"},
            "accumlab.doctor.c": {"accumlab.engine.a"}, "accumlab.ui.d": {"accumlab.cli.e"},
            "accumlab.cli.e": set()}
    assert wrong_way_imports(fake) == ["accumlab.engine.a -> accumlab.lab.b",
                                       "accumlab.data.f -> accumlab (the top-level face pulls "
                                       "in every layer)",
                                       "accumlab.lab.b -> accumlab.doctor.c",
                                       "accumlab.ui.d -> accumlab.cli.e"]
    assert find_cycle(fake) == ["accumlab.doctor.c", "accumlab.engine.a", "accumlab.lab.b",
                                "accumlab.doctor.c"]
    assert find_cycle({"accumlab.data": {"accumlab.data.x"}, "accumlab.data.x": set()}) is None
