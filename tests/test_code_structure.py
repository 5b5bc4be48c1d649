"""The library's structure, checked from its source with `ast` (nothing is imported).

- No import cycles in `posttrain/`: the graph has one node per module and an edge for every
  `import`/`from ... import` of a posttrain module, at module level and inside functions alike
  (a function-level import hides a cycle from Python's import machinery, not from a reader).
  `from a import b` is an edge to `a.b` when `a.b` is a module, else to `a`; importing `a.b.c`
  also runs the packages `a` and `a.b`, so those are edges too, except from a module inside that
  package (Python starts a package before its submodules: `stages/data.py` importing
  `posttrain.stages.common` does not depend on `stages/__init__.py`; an explicit
  `from posttrain.stages import x` in it does). A string "posttrain.x.y:function" (a dotted
  path imported on use with `importlib`) is an import made later: an edge. A module-level
  `if __name__ == "__main__":` block is the script, not the module: it adds no edge.
- A function-level import of a posttrain module is there for one reason only: to keep a light
  module light (the CLI, the flows and preflight must not pay for torch, transformers or mlflow
  before they need them). So the importing module must be light (its module-level imports,
  followed through the library, load none of HEAVY) and the imported one heavy; anything else
  belongs at the top of the file. Each module that defers imports says so, and why, in one
  comment line starting `# Lazy imports:` (one line per module, not per import: the reason is
  the same for all of them, and the rule above is what the test checks).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What a light module must not load at import time: seconds of start-up on the CLI's path.
HEAVY = {"torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "mlflow",
         "lm_eval", "numpy"}
DOTTED = re.compile(r"(posttrain(?:\.\w+)+):\w+")


@dataclass(frozen=True)
class Import:
    source: str  # importing module, e.g. "posttrain.recipes.sft"
    target: str  # imported module, e.g. "posttrain.stages.common" (or "torch": external=True)
    line: int
    in_function: bool
    external: bool = False


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def library_modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / "posttrain").rglob("*.py"))}


def _absolute(node: ast.ImportFrom, source: str, is_package: bool) -> str:
    """The absolute module a `from ... import` names (resolving relative imports)."""
    if node.level == 0:
        return node.module or ""
    base = source.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _with_parents(name: str, source: str, modules: dict[str, Path]) -> list[str]:
    """`name` and the packages above it that importing it runs: those that exist in the library
    and are not already started because `source` is inside them."""
    parts = name.split(".")
    above = [".".join(parts[:i]) for i in range(1, len(parts))]
    started = {".".join(source.split(".")[:i]) for i in range(1, source.count(".") + 1)}
    return [p for p in [*above, name] if p in modules and p not in started]


def _script_lines(tree: ast.Module) -> set[int]:
    """Lines of a module-level `if __name__ == "__main__":` block: they run in the module
    `__main__` (`python -m posttrain.recipes.sft`), which nothing imports, so no cycle can
    pass through them."""
    lines: set[int] = set()
    for node in tree.body:
        test = getattr(node, "test", None)
        if (isinstance(node, ast.If) and isinstance(test, ast.Compare)
                and isinstance(test.left, ast.Name) and test.left.id == "__name__"
                and any(isinstance(c, ast.Constant) and c.value == "__main__"
                        for c in test.comparators)):
            lines |= set(range(node.lineno, node.end_lineno + 1))
    return lines


def _function_lines(tree: ast.Module) -> set[int]:
    """Line numbers of import statements inside a function body (at any depth)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    lines.add(inner.lineno)
    return lines


def imports_of(source: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    in_function = _function_lines(tree)
    script = _script_lines(tree)
    is_package = path.name == "__init__.py"
    found: list[Import] = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in script:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            for alias in node.names:
                targets += _with_parents(alias.name, source, modules)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, source, is_package)
            named = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            targets += _with_parents(base, source, modules)
            if len(named) < len(node.names) and base in modules:
                targets.append(base)  # a name defined in the package's __init__ (or a module)
            targets += named
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            dotted = DOTTED.fullmatch(node.value)
            if not dotted or dotted.group(1) not in modules:
                continue
            targets += _with_parents(dotted.group(1), source, modules)
        else:
            continue
        for target in dict.fromkeys(targets):
            # Every module runs `posttrain/__init__.py`; it imports nothing, so it is no edge.
            if target != source and target != "posttrain":
                found.append(Import(source, target, node.lineno, node.lineno in in_function))
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if node.level == 0 else [])
            for top in dict.fromkeys(n.split(".")[0] for n in names):
                if top in HEAVY:
                    found.append(Import(source, top, node.lineno, node.lineno in in_function,
                                        external=True))
    return found


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], list[Import]]:
    modules = library_modules(root)
    edges: dict[str, set[str]] = {name: set() for name in modules}
    everything: list[Import] = []
    for name, path in modules.items():
        for imp in imports_of(name, path, modules):
            if not imp.external:
                edges[name].add(imp.target)
            everything.append(imp)
    return edges, everything


def heavy_at_import(imports: list[Import]) -> dict[str, set[str]]:
    """For each library module, the HEAVY packages that importing it loads: its own
    module-level imports and those of every library module it imports at module level."""
    direct: dict[str, set[str]] = {}
    below: dict[str, set[str]] = {}
    for imp in imports:
        direct.setdefault(imp.source, set())
        below.setdefault(imp.source, set())
        if not imp.in_function:
            (direct if imp.external else below)[imp.source].add(imp.target)
    loads: dict[str, set[str]] = {}

    def visit(name: str, seen: set[str]) -> set[str]:
        if name in loads:
            return loads[name]
        seen.add(name)
        out = set(direct.get(name, ()))
        for nxt in below.get(name, ()):
            if nxt not in seen:
                out |= visit(nxt, seen)
        return out

    for name in set(direct) | set(below):
        loads[name] = visit(name, set())
    return loads


def find_cycles(edges: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """Each strongly connected component of more than one module (Tarjan), with one cycle
    through it: (cycle, component)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return [(_one_cycle(component, edges), component) for component in components]


def _one_cycle(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest path from the component's first module back to itself, for the message."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(edges[node] & members):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    return component


def test_graph_builder_sees_function_level_and_submodule_imports(tmp_path):
    """The builder itself, on a made-up package: a function-level `from pkg import b` (b a
    submodule) closes the cycle a -> b -> a, and the message names it."""
    pkg = tmp_path / "posttrain"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from posttrain.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from posttrain import a\n    return a\n")
    (pkg / "c.py").write_text("from .sub.b import f\n"
                              "if __name__ == '__main__':\n    from posttrain import a\n")
    (pkg / "sub" / "d.py").write_text("from posttrain.sub import b\nX = 'posttrain.c:main'\n")
    edges, imports = import_graph(tmp_path)
    assert edges["posttrain.a"] == {"posttrain.sub", "posttrain.sub.b"}
    assert edges["posttrain.sub.b"] == {"posttrain.a"}
    assert edges["posttrain.c"] == {"posttrain.sub", "posttrain.sub.b"}
    assert [i.in_function for i in imports if i.source == "posttrain.sub.b"] == [True]
    # a sibling inside the started package: no edge to its __init__; a dotted path: an edge
    assert edges["posttrain.sub.d"] == {"posttrain.sub.b", "posttrain.c"}
    assert find_cycles(edges) == [(["posttrain.a", "posttrain.sub.b", "posttrain.a"],
                                   ["posttrain.a", "posttrain.sub.b"])]


def test_no_import_cycles_in_the_library():
    edges, _ = import_graph()
    cycles = find_cycles(edges)
    assert not cycles, "import cycles in posttrain/ (break each by moving the shared code down):\n" + (
        "\n".join(f"{' -> '.join(cycle)}   (one of the cycles among: {', '.join(knot)})"
                  for cycle, knot in cycles)
    )


def test_function_level_imports_only_keep_a_light_module_light():
    """Every function-level import of a library module: from a light module, of a heavy one,
    in a module whose `# Lazy imports:` line says why. Any other belongs at the top."""
    _, imports = import_graph()
    loads = heavy_at_import(imports)
    statements: dict[tuple[str, int], list[str]] = {}
    for imp in imports:
        if imp.in_function and not imp.external:
            statements.setdefault((imp.source, imp.line), []).append(imp.target)
    wrong = []
    for (source, line), targets in sorted(statements.items()):
        if loads.get(source):
            wrong.append(f"{source}:{line}: the module loads {sorted(loads[source])} anyway; "
                         "import at the top")
        elif not any(loads.get(t) for t in targets):
            wrong.append(f"{source}:{line}: {', '.join(targets)} loads none of torch & co.; "
                         "import at the top")
    modules = library_modules()
    for source in sorted({s for s, _ in statements}):
        if "# Lazy imports:" not in modules[source].read_text():
            wrong.append(f"{source}: defers imports; say why in a '# Lazy imports:' line")
    assert not wrong, "\n".join(wrong)


MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# Known exceptions, each to be split by concern (issue 19); the test fails when one is no
# longer needed, so this list only shrinks.
OVERSIZED_MODULES: set[str] = set()
LONG_FUNCTIONS: set[str] = set()


def test_modules_and_functions_stay_small():
    """No module over 400 lines and no function over 80 in posttrain/, except the listed ones."""
    big, long = set(), set()
    for path in library_modules().values():
        name = str(path.relative_to(ROOT))
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            big.add(name)
        for node in ast.walk(ast.parse(text)):
            if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES):
                long.add(f"{name}:{node.name}")
    assert big - OVERSIZED_MODULES == set(), "modules over 400 lines: split them by concern"
    assert long - LONG_FUNCTIONS == set(), "functions over 80 lines: split them"
    assert OVERSIZED_MODULES - big == set(), "small enough now: take them off OVERSIZED_MODULES"
    assert LONG_FUNCTIONS - long == set(), "short enough now: take them off LONG_FUNCTIONS"


OFFLINE_RECIPES = ("sft", "reward", "preference", "kto", "gkd")  # trained by training.fit


def test_offline_recipes_give_fit_an_objective_without_closures():
    """Issue 19: an offline recipe's train() hands `training.fit` one module-level `Objective`
    (posttrain/training/loop.py), not callbacks built as closures: no function or lambda
    defined inside a train(), and no `nonlocal` anywhere in the library."""
    for path in library_modules().values():
        tree = ast.parse(path.read_text())
        assert not any(isinstance(n, ast.Nonlocal) for n in ast.walk(tree)), path
    for recipe in OFFLINE_RECIPES:
        path = ROOT / "posttrain" / "recipes" / f"{recipe}.py"
        tree = ast.parse(path.read_text())
        trains = [n for n in tree.body if isinstance(n, ast.FunctionDef)
                  and n.name in ("train", "_train")]
        assert trains, recipe
        for train in trains:
            nested = [n for n in ast.walk(train) if n is not train
                      and isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
            assert nested == [], f"{recipe}.{train.name} defines closures at lines " \
                f"{[n.lineno for n in nested]}"
        objectives = [n.name for n in tree.body if isinstance(n, ast.ClassDef)
                      and any(getattr(b, "id", None) == "Objective" for b in n.bases)]
        assert len(objectives) == 1, (recipe, objectives)


def test_every_method_has_a_stage_function():
    """The method table (posttrain.methods, what a method is) and the stage layer's table of
    the functions that run them (posttrain.stages.graph) name the same methods."""
    from posttrain.methods import METHODS
    from posttrain.stages.graph import STAGE_FUNCTIONS

    assert sorted(STAGE_FUNCTIONS) == sorted(METHODS)
