"""The layer table of specs/architecture.md, enforced: every import in mesh/, transports/ and
backends/ (function-local and ``TYPE_CHECKING`` ones too) is parsed with ``ast`` and checked
against the table; no import loop between files or between layers; the node is a composition
root."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mesh", "transports", "backends")
GROUND = {"mesh", "mesh.errors", "mesh.wire", "mesh.security", "mesh.netif", "mesh.models", "mesh.model_cache",
          "mesh.registry", "mesh.identity", "mesh.loading"}
TOP = {"mesh.cli", "mesh.__main__"}
LAYERS = ("kernel", "placement", "runtime", "api", "node", "gym", "tools", "testing")

# spec AR2: part -> the parts it may import (besides itself and the standard library and
# third-party packages). A "part" is ground, transports, backends, a layer folder of mesh/,
# or a single module named in full where the table allows only that one file.
MAY_IMPORT: dict[str, set[str]] = {
    "ground": set(),
    "transports": {"ground"},
    "backends": {"ground"},
    "kernel": {"ground"},
    "placement": {"ground", "mesh.kernel.records", "backends"},
    "runtime": {"ground", "placement", "backends"},
    "api": {"ground", "mesh.runtime.engine"},
    "node": {"ground", "transports", "backends", "kernel", "placement", "runtime", "api"},
    "gym": {"ground", "placement"},
    "testing": {"ground", "transports", "backends", "kernel", "placement", "runtime", "api", "node"},
    "tools": {"ground", "transports", "backends", "kernel", "placement", "runtime", "api", "node", "gym", "testing"},
    "top": {"ground", "transports", "backends", "kernel", "placement", "runtime", "api", "node", "gym", "testing",
            "tools"},
}


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = modules()


def part_of(module: str) -> str:
    if module in GROUND:
        return "ground"
    if module in TOP:
        return "top"
    head, _, rest = module.partition(".")
    if head in ("transports", "backends"):
        return head
    layer = rest.split(".")[0]
    if layer in LAYERS:
        return layer
    raise AssertionError(f"{module}: not in the layer table of specs/architecture.md (spec AR1)")


def imports_of(module: str) -> set[str]:
    """The project modules ``module`` imports, anywhere in its body."""
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


GRAPH = {module: imports_of(module) for module in MODULES}


def allowed(source: str, target: str) -> bool:
    src, dst = part_of(source), part_of(target)
    if src == dst:
        return True
    permitted = MAY_IMPORT[src]
    return dst in permitted or any(target == p or target.startswith(p + ".") for p in permitted if "." in p)


@pytest.mark.spec("AR1")
def test_every_module_belongs_to_a_layer() -> None:
    for module in MODULES:
        part_of(module)  # raises for a module outside the table
    flat = sorted(m for m, path in MODULES.items() if m.count(".") == 1 and m.startswith("mesh.")
                  and path.name != "__init__.py" and m not in GROUND | TOP)
    assert not flat, f"modules directly in mesh/ that are neither ground nor the CLI: {flat}"
    for layer in LAYERS:
        assert (ROOT / "mesh" / layer / "__init__.py").is_file(), f"mesh/{layer}/ is missing"


@pytest.mark.spec("AR2")
def test_no_import_crosses_the_table() -> None:
    wrong = sorted(f"{src} ({part_of(src)}) imports {dst} ({part_of(dst)})"
                   for src, targets in GRAPH.items() for dst in targets if not allowed(src, dst))
    assert not wrong, "imports the layer table forbids:\n" + "\n".join(wrong)


def test_the_table_catches_a_forbidden_import() -> None:
    # the checker itself: a transport reaching into the node, or the API into the coordinator
    assert not allowed("transports.tcp", "mesh.node.links")
    assert not allowed("mesh.api.app", "mesh.runtime.coordinator")
    assert allowed("mesh.api.app", "mesh.runtime.engine")
    assert not allowed("mesh.testing.cluster", "mesh.tools.bench")
    assert not allowed("mesh.models", "mesh.placement.pipeline")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


@pytest.mark.spec("AR3")
def test_no_import_loop_between_files() -> None:
    # a package's __init__ is kept free of imports of its own modules, so it never closes a loop
    assert not _cycles(GRAPH), f"import loops between files: {_cycles(GRAPH)}"


@pytest.mark.spec("AR3")
def test_no_import_loop_between_layers() -> None:
    parts: dict[str, set[str]] = defaultdict(set)
    for src, targets in GRAPH.items():
        for dst in targets:
            if part_of(src) != part_of(dst):
                parts[part_of(src)].add(part_of(dst))
    for part in list(parts):
        parts.setdefault(part, set())
    assert not _cycles(dict(parts)), f"import loops between layers: {_cycles(dict(parts))}"


def test_the_loop_finder_finds_loops() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.spec("AR4")
def test_the_node_is_a_composition_root() -> None:
    path = ROOT / "mesh" / "node" / "node.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    node_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Node")
    assert not node_class.bases, f"Node has base classes {[ast.unparse(b) for b in node_class.bases]}: no mixins"
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= 255, f"mesh/node/node.py has {lines} lines; a composition root is about 250 at most"
    # no other class of the node's folder takes the node: its parts get narrow ports
    for path in (ROOT / "mesh" / "node").glob("*.py"):
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                hints = [ast.unparse(a.annotation) for a in fn.args.args + fn.args.kwonlyargs if a.annotation]
                assert "Node" not in hints, f"{path.name}:{fn.name} takes the node itself"


SANS_IO_CORES = ("mesh/runtime/request_core.py", "mesh/runtime/stage_core.py")
IO_MODULES = {"asyncio", "socket", "threading", "time", "random", "selectors", "concurrent"}


@pytest.mark.spec("AR5")
def test_the_request_plane_cores_are_sans_io() -> None:
    for name in SANS_IO_CORES:
        tree = ast.parse((ROOT / name).read_text(encoding="utf-8"))
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not imported & IO_MODULES, f"{name} imports {sorted(imported & IO_MODULES)}"
