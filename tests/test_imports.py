"""The library's imports go one way: no cycles among pali_jax's modules, and no import of convert/."""

from __future__ import annotations

import ast
from pathlib import Path

from hostile import ROOT

PACKAGE = Path(__file__).resolve().parents[1] / "pali_jax"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every pali_jax module `path` imports, at the top or inside a function (a lazy import is
    still an edge), and every convert module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "convert":
                found.add(name.split(".")[0])
            elif name in known:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: _imports(path, set(files)) - {name} for name, path in files.items()}
    # `import pali_jax.x` also runs the package's __init__: only count explicit edges.
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == "pali_jax":  # the package face re-exports; importing it is not a dependency edge
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt in graph and not state.get(nxt) and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if not state.get(node) and (found := visit(node)):
            return found
    return None


def test_library_never_imports_convert():
    offenders = sorted(name for name, deps in _graph().items() if "convert" in deps)
    assert offenders == []


def test_no_import_cycles():
    assert _cycle(_graph()) is None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_pickle_anywhere():
    """Weights come from safetensors and orbax only: no module loads pickles (np.load must say
    allow_pickle=False; no pickle / torch.load / joblib)."""
    offenders = []
    for path in sorted([*ROOT.glob("pali_jax/**/*.py"), *ROOT.glob("convert/*.py"), *ROOT.glob("benchmarks/*.py"),
                        *ROOT.glob("tests/*.py"), ROOT / "run_generate.py"]):
        if path.name == Path(__file__).name:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if ("np.load(" in code and "allow_pickle=False" not in code) or "import pickle" in code \
                    or "torch.load(" in code or "joblib" in code or "allow_pickle=True" in code:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def _project_module(name: str) -> bool:
    return name.split(".")[0] in ("pali_jax", "benchmarks", "convert", "run_generate")


def test_benchmarks_name_only_what_exists():
    """No test runs the benchmarks (they take minutes to hours), so a name they take from the
    project that a refactor moved would only fail when someone measures: every `from M import x`
    and every `M.x` on a module imported whole must resolve, lazy imports inside functions included."""
    import importlib
    import importlib.util

    missing = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text())
        aliases = {}  # local name -> project module imported whole
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and _project_module(node.module):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name) and importlib.util.find_spec(f"{node.module}.{alias.name}") is None:
                        missing.append(f"{path.name}:{node.lineno}: {node.module}.{alias.name}")
            elif isinstance(node, ast.Import):
                aliases |= {a.asname or a.name: a.name for a in node.names if _project_module(a.name) and "." not in a.name}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                if not hasattr(importlib.import_module(aliases[node.value.id]), node.attr):
                    missing.append(f"{path.name}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    assert missing == []
