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

An export may not share its name with a module of its package
(`attach` refuses it): the import system binds a module to its package's
attribute whenever it loads it, which would replace the export, and no
module `__getattr__` can stop that.
"""

import ast
import importlib
import importlib.util
import sys


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

    shadowed = sorted(name for name, (source, _) in exports.items()
                      if source == f"{package}.{name}")
    if shadowed:  # see the module docstring
        raise ImportError(f"{package} exports {shadowed}, named like modules of its own: "
                          "loading such a module would replace the export; rename the module")
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
