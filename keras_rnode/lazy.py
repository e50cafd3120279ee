"""Package exports imported when first read (PEP 562).

A package's `__init__` writes what it exports as plain imports under
`if TYPE_CHECKING:`, which readers and tools (IDEs, mypy) follow, and
binds `__getattr__, __dir__ = lazy.attach(__name__)`. Those imports never
run: `attach` reads them from the `__init__`'s source, and each name is
imported from its module the first time it is read, so that the command
line, whose help needs only option names, starts without keras and
TensorFlow. `dir()` lists the exports as if they were loaded. An export
whose module does not exist (yet) is an AttributeError when read, never an
error at `import keras_rnode`.

A package may export a name that is also one of its modules
(`keras_rnode.solvers.odeint`, the function, from the module odeint.py).
The import system binds a module to its package's attribute whenever it
loads it (`from keras_rnode.solvers.odeint import odeint` anywhere), which
would replace the export, and a module-level `__getattr__` cannot stop
that: for such a package alone `attach` gives the module a class that
refuses that one binding (the module stays reachable through
sys.modules). Renaming the module makes that unnecessary.
"""

import ast
import importlib
import importlib.util
import sys
import types


def attach(package):
    """(__getattr__, __dir__) for the package named `package` (its `__init__`'s `__name__`),
    serving the names its `if TYPE_CHECKING:` block imports."""
    module = sys.modules[package]
    exports = declared(package)

    def __getattr__(name):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        source, attr = exports[name]
        # `from package import submodule` names a module, not an attribute.
        path = f"{source}.{attr}" if source == package else source
        try:
            loaded = importlib.import_module(path)
        except ModuleNotFoundError as err:
            if err.name != path:  # a dependency of the module is missing: that error stands
                raise
            raise AttributeError(f"module {package!r} has no attribute {name!r}: {err}") from err
        value = loaded if source == package else getattr(loaded, attr)
        setattr(module, name, value)  # read once
        return value

    def __dir__():
        return sorted(set(vars(module)) | set(exports))

    shadowed = {name for name, (source, _) in exports.items() if source == f"{package}.{name}"}
    if shadowed:  # see the module docstring
        module.__class__ = _exports_over_modules(shadowed)
    return __getattr__, __dir__


def declared(package):
    """{name: (module, attribute)} of the imports under the package's `if TYPE_CHECKING:`."""
    source = sys.modules[package].__spec__.loader.get_source(package)
    if source is None:
        raise ImportError(f"{package}: its exports are read from its __init__'s source, "
                          "which this installation lacks")
    exports = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.If) and _is_type_checking(node.test)):
            continue
        for statement in node.body:
            if not isinstance(statement, ast.ImportFrom):
                raise ImportError(f"{package}, line {statement.lineno}: only `from M import "
                                  "name` lines may stand under `if TYPE_CHECKING:`")
            origin = importlib.util.resolve_name(
                "." * statement.level + (statement.module or ""), package)
            for alias in statement.names:
                exports[alias.asname or alias.name] = (origin, alias.name)
    return exports


def _is_type_checking(test):
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
            or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _exports_over_modules(names):
    """A module class that refuses to bind the submodules `names` over the exports so named."""
    def __setattr__(self, name, value):
        if not (name in names and isinstance(value, types.ModuleType)
                and value.__name__ == f"{self.__name__}.{name}"):
            types.ModuleType.__setattr__(self, name, value)
    return type("ExportsOverModules", (types.ModuleType,), {"__setattr__": __setattr__})
