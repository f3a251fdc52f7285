"""The tree's shape (docs/design.md section 4): fastkd's modules import one another without a cycle --
lazy imports inside functions count -- and no module outside a backend's directory imports that
backend's private files (reference/_rows.py, triton/_math.py, ...)."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "fastkd"


def _module(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports():
    """{module: {imported fastkd module, ...}} over every import statement of fastkd/**.py."""
    modules = {_module(p): p for p in PKG.rglob("*.py")}
    modules["fastkd._C"] = None  # the compiled extension: a leaf
    graph = {}
    for name, path in modules.items():
        if path is None:
            graph[name] = set()
            continue
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                # `from pkg import sub` imports the submodule; `from pkg import name` the package
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                candidates = subs + ([target] if len(subs) < len(node.names) else [])
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            found |= {c for c in candidates if c in modules and c != name}
        graph[name] = found
    return graph


def test_no_import_cycle():
    graph = _imports()
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_no_module_imports_a_backends_private_file():
    for name, imported in _imports().items():
        for target in imported:
            parts = target.split(".")
            if len(parts) == 3 and parts[1] in ("reference", "triton") and parts[2].startswith("_"):
                assert name.startswith(f"fastkd.{parts[1]}"), \
                    f"{name} imports {target}, a private file of backend {parts[1]}"


def test_the_check_sees_imports():
    """The walk finds the imports it must (so the tests above could fail)."""
    graph = _imports()
    assert "fastkd._options" in graph["fastkd.dense_kd"]
    assert "fastkd.distributed.rows" in graph["fastkd.distributed.losses"]
    assert "fastkd.distributed" in graph["fastkd.fused_linear_kd"]  # a lazy import, inside a function
