"""The package's imports go one way: no module reaches itself through jdnas imports, at any depth
(imports inside functions included: they hide a circle, they do not break it)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jdnas"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in modules}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walker_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_jdnas_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 40 and "jdnas.joint.search" in graph and "jdnas.engine.loop" in graph["jdnas.joint.search"]
    assert circles(graph) == []


# The layers, bottom first (docs/ARCHITECTURE.md): a module imports its own layer or one below it.
LAYERS = (
    ("errors", "io", "seeding", "paths"),
    ("models",),
    ("config", "stages"),
    ("data",),
    ("engine", "latency"),
    ("joint",),
    ("baselines",),
    ("evaluation",),
    ("cli",),
)


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "jdnas"
    if top == "jdnas":
        return len(LAYERS)  # the package's __init__: as the CLI, nothing imports it
    return next(i for i, names in enumerate(LAYERS) if top in names)


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((m, d) for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m))


def test_the_layer_check_finds_an_upward_import():
    assert upward_imports({"jdnas.models.arch": {"jdnas.joint.search"}}) == [("jdnas.models.arch", "jdnas.joint.search")]
    assert upward_imports({"jdnas.joint.search": {"jdnas.models.arch"}}) == []


def test_every_module_has_a_layer_and_imports_only_go_down():
    graph = import_graph()
    assert {layer_of(m) for m in graph}  # a module outside every layer raises StopIteration here
    assert upward_imports(graph) == []
