"""The same saved model gives the same log p under TensorFlow, JAX and PyTorch.

Runs in the TensorFlow suite; the other backends run in subprocesses
(Keras picks its backend once, at import), all at once: each spends most
of its time importing. Skipped for a backend that is not installed.
"""

import os
import subprocess
import sys
from importlib.util import find_spec

import keras
import numpy as np
import pytest

import keras_rnode as kr
from keras_rnode.datasets import toy

OTHER = ("jax", "torch")

# Under JAX the same process then exports a freshly loaded copy of the
# model as a SavedModel and reloads it with TensorFlow (argv 4 and 5).
SCRIPT = """
import sys
import numpy as np
import keras
import keras_rnode as kr  # registers the classes
model = keras.saving.load_model(sys.argv[1])
x = np.load(sys.argv[2])
log_p = keras.ops.convert_to_numpy(model.log_prob(x))
nfe = int(keras.ops.convert_to_numpy(model.blocks[0].stats["nfe"]))
np.save(sys.argv[3], np.append(log_p, nfe))
if len(sys.argv) > 4:
    model = keras.saving.load_model(sys.argv[1])
    model.export(sys.argv[4])
    import tensorflow as tf
    reloaded = tf.saved_model.load(sys.argv[4])
    np.save(sys.argv[5], reloaded.log_prob(tf.constant(x)).numpy())
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("agree")
    keras.utils.set_random_seed(3)
    net = kr.layers.ConcatSquashMLP(hidden=(32, 32), zero_init_last=False)
    cnf = kr.layers.CNF(net, trace="exact", rtol=1e-6, atol=1e-6)
    model = kr.RNODE([cnf])
    x = toy("pinwheel", 64, seed=1)
    log_p = keras.ops.convert_to_numpy(model.log_prob(x))
    nfe = int(cnf.stats["nfe"].numpy())
    model.save(path / "model.keras")
    np.save(path / "x.npy", x)
    return path, log_p, nfe


@pytest.fixture(scope="module")
def runs(saved):
    """Each installed other backend's run of SCRIPT on the saved model, run side by side:
    backend -> (exit code, stderr)."""
    path = saved[0]
    procs = {}
    for backend in OTHER:
        if find_spec(backend) is None:
            continue
        args = [path / "model.keras", path / "x.npy", path / f"{backend}.npy"]
        if backend == "jax":
            args += [path / "exported", path / "exported.npy"]
        env = dict(os.environ, KERAS_BACKEND=backend)
        # stderr to a file: a full pipe would stall a process while we wait on another.
        with open(path / f"{backend}.err", "w") as err:
            procs[backend] = subprocess.Popen(
                [sys.executable, "-c", SCRIPT, *map(str, args)], env=env,
                stdout=subprocess.DEVNULL, stderr=err)
    out = {}
    for backend, proc in procs.items():
        try:
            proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out[backend] = (proc.returncode, (path / f"{backend}.err").read_text())
    return out


@pytest.mark.parametrize("backend", OTHER)
def test_log_prob_agrees_with_tensorflow(saved, runs, backend):
    if find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    path, log_p, nfe = saved
    returncode, stderr = runs[backend]
    assert returncode == 0, stderr[-3000:]
    theirs = np.load(path / f"{backend}.npy")
    # The dynamics are not trivial, and the solves took the same steps.
    assert np.abs(log_p - kr.models.rnode.standard_normal_log_prob(
        toy("pinwheel", 64, seed=1)).numpy()).max() > 0.1
    assert int(theirs[-1]) == nfe
    np.testing.assert_allclose(theirs[:-1], log_p, rtol=1e-5, atol=1e-5)


def test_jax_exports_a_saved_model_with_log_prob(saved, runs):
    if find_spec("jax") is None:
        pytest.skip("jax is not installed")
    path, log_p, _ = saved
    returncode, stderr = runs["jax"]
    assert returncode == 0, stderr[-3000:]
    np.testing.assert_allclose(np.load(path / "exported.npy"), log_p, rtol=1e-5, atol=1e-5)
