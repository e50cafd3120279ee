"""The package works under JAX and PyTorch with TensorFlow absent (issue 16).

The GPU machines this project borrows have JAX and PyTorch, not
TensorFlow. Each test runs a child Python whose `sitecustomize` hides
TensorFlow and TensorFlow Probability from every import finder, as if they
were not installed (importlib.util.find_spec answers None, `import
tensorflow` raises ModuleNotFoundError), so Keras's own optional imports
of TensorFlow take their absent branch too. The API test also hides
scikit-learn and matplotlib: building, training, scoring, sampling and
saving need neither. Each child checks at the end that none of the hidden
packages was loaded.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.backends

ROOT = Path(__file__).resolve().parents[1]

# Hide packages from every meta-path finder: absent, not broken (a finder that
# raised instead would break libraries that probe with find_spec, as torch does).
SITECUSTOMIZE = """
import sys

HIDDEN = {hidden!r}


class _Hide:
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        find = getattr(self.inner, "find_spec", None)
        return find(name, path, target) if find else None

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


sys.meta_path[:] = [_Hide(finder) for finder in sys.meta_path]
"""

NO_TF = ("tensorflow", "tensorflow_probability", "tf_keras")

CHECK_HIDDEN = """
import sys
loaded = sorted({{m.partition(".")[0] for m in sys.modules}} & set({hidden!r}))
assert not loaded, f"loaded though hidden: {{loaded}}"
print("HIDDEN-NOT-LOADED")
"""

API = """
import numpy as np
import keras
import keras_rnode as kr

x = kr.datasets.toy("8gaussians", 64, seed=0)
dynamics = kr.layers.ConcatSquashMLP(hidden=(8,))
cnf = kr.layers.CNF(dynamics, method="euler", step_size=0.5, trace="exact")
model = kr.RNODE([cnf], kinetic=0.01, jacobian=0.01)
model.compile(optimizer=keras.optimizers.Adam(1e-3))
model.fit(x, batch_size=32, epochs=1, verbose=0)                      # arrays
batches = kr.datasets.make_dataset(x, batch_size=32, seed=0)
assert isinstance(batches, keras.utils.PyDataset), type(batches)
history = model.fit(batches, epochs=1, steps_per_epoch=1, verbose=0)   # a PyDataset
assert np.isfinite(history.history["loss"][-1])

log_prob = keras.ops.convert_to_numpy(model.log_prob(x[:4]))
assert log_prob.shape == (4,) and np.all(np.isfinite(log_prob))
samples = keras.ops.convert_to_numpy(model.sample(3))
assert samples.shape == (3, 2) and np.all(np.isfinite(samples))

path = {path!r}
model.save(path)
again = keras.saving.load_model(path)
np.testing.assert_allclose(keras.ops.convert_to_numpy(again.log_prob(x[:4])), log_prob,
                           rtol=1e-6)

# A SavedModel is TensorFlow's: asking for one says what is missing.
try:
    model.export(path + ".savedmodel")
except (ImportError, ValueError) as err:
    message = str(err)
else:
    raise AssertionError("export without TensorFlow did not fail")
assert "tensorflow" in message.lower(), message
if keras.backend.backend() == "jax":
    assert "needs TensorFlow" in message, message
# So does the TensorFlow Probability face.
try:
    import keras_rnode.distributions  # noqa: F401
except ImportError as err:
    assert "TensorFlow" in str(err), err
else:
    raise AssertionError("keras_rnode.distributions imported off TensorFlow")
"""

CLI = """
import json, os
from click.testing import CliRunner
from keras_rnode.cli import main

runner = CliRunner()
run = {run!r}
fast = ["--method", "euler", "--step-size", "0.5", "--eval-method", "euler",
        "--eval-step-size", "0.5"]


def invoke(*args):
    result = runner.invoke(main, list(args))
    return result.exit_code, result.output


code, out = invoke("train", "--dataset", "8gaussians", "--hidden", "8", "--steps", "2",
                   "--batch-size", "32", "--n-train", "64", "--n-test", "64", "-q",
                   *fast, "--out", run)
assert code == 0, out
assert os.path.exists(os.path.join(run, "model.keras")), os.listdir(run)
code, out = invoke("evaluate", run, "--json")
assert code == 0, out
code, out = invoke("sample", run, "-n", "5", "--out", os.path.join(run, "s.npy"))
assert code == 0, out
# matplotlib draws a .png where it is installed (it is not hidden here).
code, out = invoke("sample", run, "-n", "5", "--out", os.path.join(run, "s.png"))
assert code == 0, out
code, out = invoke("export", run, "--out", os.path.join(run, "exported"))
assert code == 1 and "tensorflow" in out.lower() and "Traceback" not in out, out
print("CLI-OK")
"""


def run_child(tmp_path, backend, code, hidden, timeout=240):
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(hidden=tuple(hidden)))
    env = {**os.environ, "KERAS_BACKEND": backend,
           "PYTHONPATH": os.pathsep.join([str(site), str(ROOT),
                                          os.environ.get("PYTHONPATH", "")])}
    script = textwrap.dedent(code) + CHECK_HIDDEN.format(hidden=tuple(hidden))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "HIDDEN-NOT-LOADED" in proc.stdout
    return proc.stdout


def test_the_hook_hides_tensorflow(tmp_path):
    out = run_child(tmp_path, "jax", """
        import importlib.util
        assert importlib.util.find_spec("tensorflow") is None
        try:
            import tensorflow  # noqa: F401
        except ModuleNotFoundError:
            pass
        else:
            raise AssertionError("tensorflow imported")
        from keras_rnode.backend.common import import_tensorflow
        try:
            import_tensorflow("a feature")
        except ImportError as err:
            assert str(err).startswith("a feature needs TensorFlow"), err
        else:
            raise AssertionError("import_tensorflow found TensorFlow")
        print("HOOK-OK")
        """, NO_TF, timeout=120)
    assert "HOOK-OK" in out


@pytest.fixture
def backend():
    """The suite's own backend: the JAX suite checks JAX, the PyTorch suite PyTorch, each once."""
    name = os.environ.get("KERAS_BACKEND", "tensorflow")
    if name == "tensorflow":
        pytest.skip("run by the JAX and PyTorch suites, each for its own backend")
    return name


def test_api_without_tensorflow_sklearn_or_matplotlib(tmp_path, backend):
    run_child(tmp_path, backend, API.format(path=str(tmp_path / "m.keras")),
              NO_TF + ("sklearn", "matplotlib"))


def test_cli_without_tensorflow(tmp_path, backend):
    out = run_child(tmp_path, backend, CLI.format(run=str(tmp_path / "run")), NO_TF)
    assert "CLI-OK" in out

