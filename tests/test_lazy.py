"""Packages import their exports when first read (keras_rnode.lazy).

Whether keras is loaded depends on the whole process, so the checks on
keras_rnode itself run in a fresh interpreter; the mechanism's own edges
run on a small package written for the test.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("keras_rnode", "keras_rnode.datasets", "keras_rnode.layers", "keras_rnode.solvers")


def fresh_python(script):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_packages_load_no_keras_and_list_what_they_declare():
    out = fresh_python(f"""
        import importlib, json, sys
        from keras_rnode import lazy
        out = {{}}
        for name in {PACKAGES!r}:
            package = importlib.import_module(name)
            out[name] = {{"all": sorted(package.__all__), "declared": sorted(lazy.declared(name)),
                          "unlisted": sorted(set(package.__all__) - set(dir(package)))}}
        out["loaded"] = sorted(m for m in ("keras", "tensorflow", "jax", "torch")
                               if m in sys.modules)
        print(json.dumps(out))
    """)
    assert out.pop("loaded") == []
    for name, package in out.items():
        assert package["declared"], name
        assert package["all"] == package["declared"], name
        assert package["unlisted"] == [], name


@pytest.mark.backends
def test_with_keras_loaded_the_classes_register_and_odeint_is_the_function():
    # As layers/cnf.py does: the module defining odeint imported first.
    out = fresh_python("""
        import json
        import keras
        from keras_rnode.solvers.solve import odeint
        import keras_rnode as kr
        print(json.dumps({
            "registered": [keras.saving.get_registered_object(f"keras_rnode>{name}") is not None
                           for name in ("RNODE", "MultiscaleRNODE", "CNF", "ConcatSquashMLP")],
            "functions": [kr.solvers.odeint is odeint, kr.odeint is odeint],
        }))
    """)
    assert out == {"registered": [True] * 4, "functions": [True, True]}


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package `lazypkg` exporting `value` (from a module), `missing` (no such module) and
    `broken` (a module whose import fails); its module tool.py defines `tool`."""
    root = tmp_path / "lazypkg"
    root.mkdir()
    (root / "__init__.py").write_text(textwrap.dedent("""
        from typing import TYPE_CHECKING

        from keras_rnode import lazy

        if TYPE_CHECKING:
            from lazypkg import broken, missing
            from lazypkg.values import value as renamed

        __getattr__, __dir__ = lazy.attach(__name__)
    """))
    (root / "values.py").write_text("value = 42\n")
    (root / "tool.py").write_text("def tool():\n    return 'the function'\n")
    (root / "broken.py").write_text("import lazypkg_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "lazypkg"
    for name in [m for m in sys.modules if m.partition(".")[0] == "lazypkg"]:
        del sys.modules[name]


def test_exports_load_when_read_and_missing_modules_read_as_missing(package):
    import importlib

    pkg = importlib.import_module(package)
    assert {"broken", "missing", "renamed"} <= set(dir(pkg))
    assert f"{package}.values" not in sys.modules
    assert pkg.renamed == 42
    assert f"{package}.values" in sys.modules
    assert not hasattr(pkg, "missing")
    with pytest.raises(AttributeError, match="No module named 'lazypkg.missing'"):
        pkg.missing
    # A module that exists but fails to import says why, as a plain import would.
    with pytest.raises(ModuleNotFoundError, match="lazypkg_no_such_dependency"):
        pkg.broken
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        pkg.nothing


def test_an_export_named_like_its_module_is_refused(package, tmp_path):
    import importlib

    init = tmp_path / package / "__init__.py"
    init.write_text(init.read_text().replace(
        "from lazypkg import broken, missing", "from lazypkg.tool import tool"))
    with pytest.raises(ImportError, match=r"exports \['tool'\], named like modules"):
        importlib.import_module(package)
