"""Packages whose public names are imported when first read.

`import keras_rnode` (or one of its subpackages) loads none of its
modules: each exported name is imported from its module the first time it
is read (a module `__getattr__`, as PEP 562 allows, here on the module's
class), so that the command line, whose help needs only option names,
starts without keras and TensorFlow. `dir()` lists the exported names as
if they were loaded.

A package may export a name that is also one of its modules
(`keras_rnode.solvers.odeint`, the function, from the module odeint.py):
the import system binds a module to its package's attribute when it
loads it, which would replace the export; such a binding is refused and
the module stays reachable through sys.modules, as it was when the
package imported its names eagerly.
"""

import importlib
import sys
import types


class LazyPackage(types.ModuleType):
    """A package module whose exports load when first read: `_exports` ({name: the module
    defining it}) and `_submodules` (names of its own modules)."""

    def __getattr__(self, name):
        if name in self.__dict__.get("_submodules", ()):
            value = importlib.import_module(f"{self.__name__}.{name}")
        elif name in self.__dict__.get("_exports", {}):
            value = getattr(importlib.import_module(self._exports[name]), name)
        else:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        self.__dict__[name] = value  # read once
        return value

    def __dir__(self):
        return sorted(set(self.__dict__) | set(self._exports) | set(self._submodules))

    def __setattr__(self, name, value):
        shadowing = (name in self.__dict__.get("_exports", {})
                     and isinstance(value, types.ModuleType)
                     and value.__name__ == f"{self.__name__}.{name}")
        if not shadowing:
            super().__setattr__(name, value)


def lazy_package(name, exports, submodules=()):
    """Make the package `name` (its __init__'s __name__) a LazyPackage.

    `exports` maps each public name to the module that defines it;
    `submodules` are the package's own modules that are public names too.
    """
    package = sys.modules[name]
    package.__dict__.update(_exports=dict(exports), _submodules=tuple(submodules))
    package.__class__ = LazyPackage
