"""The package's layout as the README draws it: layers that import only downwards, no import circles (counting
imports inside functions), function-level imports only for optional heavy dependencies (with the reason beside
them), no class over 300 lines and no function over 60."""
import ast
import os
from collections import defaultdict

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fastattn_dist")

# Bottom to top; a module may import its own layer's modules (no circles) and the layers below.
LAYERS = [
    {"version", "recorder", "masks", "rope", "devices", "lru", "files", "reference_block"},
    {"attention"},
    {"kv"},
    {"parallel"},
    {"runner", "tuning", "profiler"},
    {"block"},
    {"models"},
    {"cli"},
    {"__init__", "__main__"},
]
# Imported inside functions only: optional, heavy, or hardware-bound (Triton kernels, transformers, plotting, MPI).
OPTIONAL = ("triton", "transformers", "matplotlib", "mpi4py", "torch.profiler",
            "torch.distributed._symmetric_memory", "torch.utils.cpp_extension")
MAX_FUNCTION_LINES, MAX_CLASS_LINES = 60, 300


def modules():
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                name = "fastattn_dist" if rel == "__init__" else "fastattn_dist." + rel.replace(".__init__", "")
                out[name] = path
    return out


MODULES = modules()


def resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> list:
    """The package modules an ``import`` / ``from`` statement in ``module`` reaches."""
    if node.level:
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_pkg else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = []
    for alias in node.names:  # ``from . import triton_fa`` names a module
        if f"{target}.{alias.name}" in MODULES:
            found.append(f"{target}.{alias.name}")
    return found or ([target] if target in MODULES else [])


def imports():
    """(importer, imported, line, at function level, the source line and the one before) for every import."""
    out = []
    for name, path in MODULES.items():
        src = open(path).read()
        lines = src.splitlines()
        tree = ast.parse(src)
        is_pkg = path.endswith("__init__.py")
        in_func = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_func |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets = resolve(name, is_pkg, node)
                ext = [] if targets else [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name in MODULES]
                ext = [a.name for a in node.names if a.name not in MODULES]
            else:
                continue
            context = " ".join(lines[max(0, node.lineno - 2):node.end_lineno])
            for t in targets:
                out.append((name, t, node.lineno, id(node) in in_func, context))
            for e in ext:
                out.append((name, "ext:" + e, node.lineno, id(node) in in_func, context))
    return out


IMPORTS = imports()


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer of the layout: add it to the README's layout and to LAYERS")


def test_every_module_has_a_layer():
    for m in MODULES:
        layer_of(m)


def test_no_module_imports_one_above_it():
    up = [(a, b, line) for a, b, line, _, _ in IMPORTS if not b.startswith("ext:") and layer_of(b) > layer_of(a)]
    assert up == []


def test_no_import_circle():
    graph = defaultdict(set)
    for a, b, _, _, _ in IMPORTS:
        if not b.startswith("ext:") and a != b:
            graph[a].add(b)
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in list(MODULES):
        if v not in index:
            visit(v)
    # a package and the submodules its __init__ re-exports are one unit; any other circle is a design error
    circles = [c for c in circles if not all(m.startswith(min(c, key=len)) for m in c)]
    assert circles == []


def _heavy(target: str) -> bool:
    """Our modules that import Triton at their top (they load only where Triton does)."""
    if target.startswith("ext:"):
        return target[4:].startswith(OPTIONAL)
    return any(a == target and b == "ext:triton" and not f for a, b, _, f, _ in IMPORTS) or \
        any(a == target and b.startswith("ext:triton.") and not f for a, b, _, f, _ in IMPORTS)


def test_function_level_imports_are_optional_dependencies_with_a_reason():
    bad = []
    for a, b, line, in_function, context in IMPORTS:
        if not in_function:
            continue
        if not _heavy(b):
            bad.append(f"{a}:{line} imports {b} inside a function")
        elif "#" not in context:
            bad.append(f"{a}:{line} imports {b} inside a function without a comment saying why")
    assert bad == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_functions_and_classes_are_short(module):
    tree = ast.parse(open(MODULES[module]).read())
    long = []
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES:
            long.append(f"def {n.name}: {n.end_lineno - n.lineno + 1} lines")
        if isinstance(n, ast.ClassDef) and n.end_lineno - n.lineno + 1 > MAX_CLASS_LINES:
            long.append(f"class {n.name}: {n.end_lineno - n.lineno + 1} lines")
    assert long == []
