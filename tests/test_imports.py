"""The package's imports form no cycle (issue 11): data flows one way, lower modules never
import upper ones, and no function hides an import of an ftcnn module (a function-local
import is how a cycle or an upward reach hides from the module-level graph)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

import ftcnn

ROOT = Path(ftcnn.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("ftcnn",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _module_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements that run at import time: the body, and inside its if/try/with blocks
    (an `if TYPE_CHECKING:` import is an edge too), but not inside functions or classes."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            for block in ("body", "orelse", "finalbody"):
                yield from _module_level(getattr(node, block, []))
            for handler in getattr(node, "handlers", []):
                yield from _module_level(handler.body)


def _targets(node: ast.stmt, package: str, modules: dict[str, Path]) -> set[str]:
    """The ftcnn modules an import statement names (`from ftcnn import faults` is an
    edge to ftcnn.injection.faults, not to the package ftcnn)."""
    edges: set[str] = set()
    if isinstance(node, ast.Import):
        edges |= {a.name for a in node.names if a.name in modules}
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:
            target = f"{base}.{alias.name}"
            if target in modules:
                edges.add(target)
            elif base in modules and base != "ftcnn":
                edges.add(base)
    return edges


def _package(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def import_graph() -> dict[str, set[str]]:
    """Module -> ftcnn modules it imports when it is imported (package __init__ files
    excluded as targets)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in _module_level(ast.parse(path.read_text()).body):
            edges |= _targets(node, _package(name, path), modules)
        graph[name] = edges - {name}
    return graph


def _local_ftcnn_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, statement) of every import of an ftcnn module inside a function, lambda or method."""
    found = []
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.ImportFrom):
                is_ftcnn = bool(node.level) or (node.module or "").split(".")[0] == "ftcnn"
            elif isinstance(node, ast.Import):
                is_ftcnn = any(a.name.split(".")[0] == "ftcnn" for a in node.names)
            else:
                continue
            if is_ftcnn:
                found.append((node.lineno, ast.unparse(node)))
    return found


def local_imports() -> list[str]:
    """Every import of an ftcnn module inside a function or method, as "file:line statement".
    Optional third-party dependencies (ray, onnx) may be imported where they are used;
    they are no ftcnn modules, so nothing here needs an allow-list."""
    found = {(str(path.relative_to(ROOT.parent)), line, text)
             for path in _modules().values() for line, text in _local_ftcnn_imports(ast.parse(path.read_text()))}
    return [f"{file}:{line} {text}" for file, line, text in sorted(found)]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert "ftcnn.campaigns.campaign" in graph and "ftcnn.injection.faults" in graph["ftcnn.campaigns.campaign"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_no_function_local_import_of_ftcnn_modules() -> None:
    found = local_imports()
    assert not found, "import ftcnn modules at module level:\n" + "\n".join(found)


def test_the_checks_see_hidden_imports(tmp_path) -> None:
    """The walkers find what they must: a TYPE_CHECKING import, an import in a function."""
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ftcnn.injection import faults\n"
              "def f():\n    from ftcnn.campaigns import campaign\n    import ray\n")
    tree = ast.parse(source)
    level = [n for n in _module_level(tree.body) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert [ast.unparse(n) for n in level] == ["from typing import TYPE_CHECKING",
                                                 "from ftcnn.injection import faults"]
    modules = {"ftcnn.injection.faults": tmp_path, "ftcnn.campaigns.campaign": tmp_path}
    assert _targets(level[1], "ftcnn", modules) == {"ftcnn.injection.faults"}
    assert _local_ftcnn_imports(tree) == [(5, "from ftcnn.campaigns import campaign")]  # ray is no ftcnn module


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_api_never_imports_the_cli() -> None:
    graph = import_graph()
    assert all("ftcnn.cli" not in edges for name, edges in graph.items() if name not in ("ftcnn.cli", "ftcnn.__main__"))


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_trials_sit_below_the_campaign_and_its_executors() -> None:
    """trials < store, distributed < campaign: nothing below reaches up, even indirectly."""
    graph = import_graph()
    assert "ftcnn.campaigns.trials" in graph["ftcnn.campaigns.distributed"] and "ftcnn.campaigns.distributed" in graph["ftcnn.campaigns.campaign"]
    assert not _reach(graph, "ftcnn.campaigns.trials") & {"ftcnn.campaigns.campaign", "ftcnn.campaigns.store", "ftcnn.campaigns.distributed"}
    assert not _reach(graph, "ftcnn.campaigns.distributed") & {"ftcnn.campaigns.campaign", "ftcnn.campaigns.store"}
    assert not _reach(graph, "ftcnn.campaigns.store") & {"ftcnn.campaigns.campaign", "ftcnn.campaigns.distributed"}
    for low in ("ftcnn.injection.faults", "ftcnn.campaigns.strata", "ftcnn.campaigns.metrics", "ftcnn.injection.fastpath"):
        assert "ftcnn.campaigns.trials" not in _reach(graph, low), low



def _unnamed(page: str, names: list[str]) -> list[str]:
    return [name for name in names if f"`{name}" not in page and f" {name}" not in page]


def test_every_module_is_in_the_architecture_page() -> None:
    """docs/architecture.md names every module of the package (and every subpackage), so a new
    or renamed module cannot go unexplained there."""
    import pkgutil
    from pathlib import Path

    import ftcnn

    page = (Path(__file__).resolve().parent.parent / "docs" / "architecture.md").read_text()
    names = [m.name + ("/" if m.ispkg else ".py") for m in pkgutil.iter_modules(ftcnn.__path__)]
    folders = [m for m in pkgutil.iter_modules(ftcnn.__path__) if m.ispkg and m.name != "models"]
    names += [f"{sub.name}.py" for folder in folders  # the layers' folders: each module in them, too
              for sub in pkgutil.iter_modules([str(Path(ftcnn.__path__[0]) / folder.name)])]
    assert len(names) > 30 and "models/" in names and "campaigns/" in names and "campaign.py" in names
    assert not _unnamed(page, names), f"docs/architecture.md does not name {_unnamed(page, names)}"
    assert _unnamed(page, ["nosuchmodule.py"]) == ["nosuchmodule.py"]  # the check can fail


# the folders of src/ftcnn, lowest first: a module may import its own folder, a lower one, or the base
# modules at the top level; the base imports no folder; only the CLI (and ``python -m``) imports flows/
LAYERS = ("injection", "campaigns", "reporting", "protection", "flows")


def layer_breaks(graph: dict[str, set[str]]) -> list[str]:
    """Imports that reach up the layers of ``LAYERS`` (empty when the folders form layers)."""
    def layer(module: str) -> int | None:  # None: a base module (top level, not the CLI)
        parts = module.split(".")
        if len(parts) > 2 and parts[1] in LAYERS:
            return LAYERS.index(parts[1])
        return len(LAYERS) if parts[1] in ("cli", "__main__") else None
    found = []
    for source, targets in graph.items():
        if source == "ftcnn" or source.startswith("ftcnn.models"):
            continue
        for target in targets:
            low, high = layer(target), layer(source)
            if low is not None and (high is None or low > high):
                found.append(f"{source} imports {target}")
    return sorted(found)


def test_the_folders_are_layers() -> None:
    assert not layer_breaks(import_graph()), "\n".join(layer_breaks(import_graph()))
    # the check can fail: a base module reaching into a folder, a lower folder reaching up
    assert layer_breaks({"ftcnn.data": {"ftcnn.campaigns.trials"}}) == ["ftcnn.data imports ftcnn.campaigns.trials"]
    assert layer_breaks({"ftcnn.injection.faults": {"ftcnn.campaigns.trials"}}) == \
        ["ftcnn.injection.faults imports ftcnn.campaigns.trials"]
    assert layer_breaks({"ftcnn.flows.study": {"ftcnn.campaigns.trials", "ftcnn.files"},
                         "ftcnn.cli": {"ftcnn.flows.study"}}) == []
