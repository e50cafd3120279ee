"""The same saved model gives the same log p under TensorFlow, JAX and PyTorch.

Runs in the TensorFlow suite; the other backends run in subprocesses
(Keras picks its backend once, at import). Skipped for a backend that is
not installed.
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


@pytest.mark.parametrize("backend", OTHER)
def test_log_prob_agrees_with_tensorflow(saved, backend):
    if find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    path, log_p, nfe = saved
    out = path / f"{backend}.npy"
    env = dict(os.environ, KERAS_BACKEND=backend)
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path / "model.keras"), str(path / "x.npy"),
         str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = np.load(out)
    # The dynamics are not trivial, and the solves took the same steps.
    assert np.abs(log_p - kr.models.rnode.standard_normal_log_prob(
        toy("pinwheel", 64, seed=1)).numpy()).max() > 0.1
    assert int(theirs[-1]) == nfe
    np.testing.assert_allclose(theirs[:-1], log_p, rtol=1e-5, atol=1e-5)


EXPORT_SCRIPT = """
import sys
import numpy as np
import keras
import keras_rnode as kr
model = keras.saving.load_model(sys.argv[1])
model.export(sys.argv[3])
import tensorflow as tf
reloaded = tf.saved_model.load(sys.argv[3])
x = np.load(sys.argv[2])
np.save(sys.argv[4], reloaded.log_prob(tf.constant(x)).numpy())
"""


def test_jax_exports_a_saved_model_with_log_prob(saved, tmp_path):
    if find_spec("jax") is None:
        pytest.skip("jax is not installed")
    path, log_p, _ = saved
    out = tmp_path / "log_p.npy"
    env = dict(os.environ, KERAS_BACKEND="jax")
    run = subprocess.run(
        [sys.executable, "-c", EXPORT_SCRIPT, str(path / "model.keras"), str(path / "x.npy"),
         str(tmp_path / "exported"), str(out)], env=env, capture_output=True, text=True,
        timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    np.testing.assert_allclose(np.load(out), log_p, rtol=1e-5, atol=1e-5)
