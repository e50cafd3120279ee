"""The package's shape, read from its source: imports run one way, private methods stay home.

- No import cycle inside keras_rnode, counting the imports inside functions
  (a cycle broken only by a late import is still two modules that need each
  other); the `if TYPE_CHECKING:` blocks of the package `__init__`s, which
  never run, are left out.
- No file calls a private method (`obj._name(...)`) that another of the
  package's files defines: a neighbour that needs it gets a public method.
"""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "keras_rnode"


def modules():
    """{dotted module name: parsed source} of every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = (path, ast.parse(path.read_text()))
    return out


def _type_checking(node):
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
            or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported(name, path, tree, known):
    """The package's modules that module `name` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                for alias in child.names:
                    # `from package import module` imports the module.
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known
                              else base)
            visit(child)

    visit(tree)
    return {m for m in found if m in known and m != name}


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in graph:
        if v not in index:
            strong(v)
    return found


def test_no_import_cycle_inside_the_package():
    found = modules()
    graph = {name: imported(name, path, tree, found) for name, (path, tree) in found.items()}
    assert cycles(graph) == []
    # The check has teeth: a module that imports one of its importers is a cycle.
    graph["keras_rnode.checks"] = graph["keras_rnode.checks"] | {"keras_rnode.runs"}
    assert cycles(graph)


def test_no_file_calls_another_files_private_methods():
    found = modules()
    defined = {}  # private function name -> the files defining it
    for name, (path, tree) in found.items():
        for node in ast.walk(tree):
            if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and node.name.startswith("_") and not node.name.startswith("__")):
                defined.setdefault(node.name, set()).add(path)
    calls = []
    for name, (path, tree) in found.items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            method, owner = node.func.attr, node.func.value
            if method not in defined or path in defined[method]:
                continue
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue  # a subclass calling what it inherits
            if (isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name)
                    and owner.func.id == "super"):
                continue
            calls.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} "
                         f"{ast.unparse(node.func)}")
    assert calls == []
