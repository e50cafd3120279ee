"""The RNODE model: training, metrics, bits/dim, sampling, saving and SavedModel export.

Runs under every Keras backend: `fit` from a tf.data pipeline compiled as
each backend compiles a training step (a TensorFlow graph, jax.jit, eager
PyTorch). The SavedModel export runs where Keras writes one: from
TensorFlow, and from JAX through jax2tf (log_prob only); not from PyTorch.
"""

import math
import os

import keras
import numpy as np
import pytest

import keras_rnode as kr
from keras_rnode.backend import REPORTS_BACKWARD
from keras_rnode.layers.cnf import EVALUATION_SEED
from keras_rnode.datasets import make_dataset, toy
from tests.backend_utils import BACKEND, np_

pytestmark = pytest.mark.backends

LEVELS = 5
ALPHA = 0.05
# Graph mode on TensorFlow (XLA, rnode train's default, is tested in test_cli),
# jax.jit on JAX (an uncompiled JAX step retraces the solver's loops every
# step), eager on PyTorch.
JIT_COMPILE = BACKEND == "jax"
# The solver's statistics logged by fit: JAX's custom gradient is a pure
# function and cannot report the backward solve's.
FIT_STATS = ("nfe", "backward_nfe") if REPORTS_BACKWARD else ("nfe",)


def toy_model(seed=0):
    """A tiny deterministic 2-D model: exact trace, rk4 training with the adjoint (whose
    backward NFE is logged), dopri5 evaluation."""
    dynamics = kr.layers.ConcatSquashMLP(hidden=(16, 16))
    cnf = kr.layers.CNF(dynamics, trace="exact", method="rk4", step_size=0.25,
                        gradient="adjoint", eval_method="dopri5", eval_rtol=1e-4,
                        eval_atol=1e-4, seed=seed)
    return kr.RNODE([cnf], kinetic=0.01, jacobian=0.01, seed=seed)


def image_model(trace="exact", zero_init_last=True):
    dynamics = kr.layers.ConcatSquashConvNet(channels=(4,), zero_init_last=zero_init_last)
    cnf = kr.layers.CNF(dynamics, trace=trace, method="rk4", step_size=0.5,
                        gradient="adjoint", eval_method="rk4", eval_step_size=0.5, seed=0)
    return kr.RNODE([cnf], levels=LEVELS, logit_alpha=ALPHA, seed=0)


def images(n, seed=0):
    return np.random.default_rng(seed).integers(0, LEVELS, (n, 3, 3, 1)).astype(np.uint8)


def nll(model, x):
    return float(-np.mean(np_(model.log_prob(x))))


@pytest.fixture(scope="module")
def trained():
    """A toy model after 30 training steps (compiled as JIT_COMPILE says), with
    held-out data and the held-out nll before training."""
    keras.utils.set_random_seed(0)
    x = toy("8gaussians", 512, seed=0)
    x_eval = toy("8gaussians", 256, seed=1)
    model = toy_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=JIT_COMPILE)
    before = nll(model, x_eval)
    history = model.fit(make_dataset(x, 128, seed=0, repeat=True), epochs=3,
                        steps_per_epoch=10, verbose=0, shuffle=False)
    return model, x_eval, before, history.history


# ------------------------------------------------------------------ training --


def test_fit_lowers_the_held_out_nll(trained):
    model, x_eval, before, history = trained
    after = nll(model, x_eval)
    assert np.isfinite(after)
    assert after < before - 0.1, (before, after)
    assert history["loss"][-1] < history["loss"][0]


def test_fit_logs_every_metric(trained):
    _, _, _, history = trained
    for name in ("loss", "nll", "kinetic", "jacobian") + FIT_STATS:
        assert name in history, sorted(history)
        assert np.all(np.isfinite(history[name])), (name, history[name])
    assert "bpd" not in history
    # rk4, 4 steps of 4 stages; the adjoint runs the same fixed grid backwards.
    assert history["nfe"][-1] == 16
    if REPORTS_BACKWARD:
        assert history["backward_nfe"][-1] > 0
    else:
        assert "backward_nfe" not in history
    assert history["kinetic"][-1] > 0 and history["jacobian"][-1] > 0
    # loss = nll + lambda_K kinetic + lambda_J jacobian (per-epoch means of per-step values).
    expected = (np.array(history["nll"]) + 0.01 * np.array(history["kinetic"])
                + 0.01 * np.array(history["jacobian"]))
    np.testing.assert_allclose(history["loss"], expected, rtol=1e-4)


def test_image_model_logs_bits_per_dim():
    model = image_model(trace="hutchinson", zero_init_last=False)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=JIT_COMPILE)
    history = model.fit(make_dataset(images(16), 8, seed=0), epochs=1, verbose=0,
                        shuffle=False).history
    assert model.likelihood_metric == "bpd"
    for name in ("loss", "bpd", "kinetic", "jacobian") + FIT_STATS:
        assert name in history, sorted(history)
        assert np.isfinite(history[name][-1])
    assert "nll" not in history
    assert 0 < history["bpd"][-1] < 20


# ----------------------------------------------------------------- bits/dim --


def hand_bits_per_dim(x, levels, alpha, u):
    """DESIGN.md section 2 in numpy float64, for an identity flow (z(T) = logit input)."""
    x = np.asarray(x, np.float64)
    dims = math.prod(x.shape[1:])
    y = (x + u) / levels
    s = alpha + (1 - 2 * alpha) * y
    z = np.log(s) - np.log1p(-s)
    logdet = np.sum(np.log1p(-2 * alpha) - np.log(s) - np.log1p(-s), axis=(1, 2, 3))
    log_normal = np.sum(-0.5 * z ** 2 - 0.5 * math.log(2 * math.pi), axis=(1, 2, 3))
    log_p = log_normal + logdet
    return -(log_p / dims - math.log(levels)) / math.log(2)


def test_bits_per_dim_matches_hand_computation_of_identity_flow():
    # Zero-initialized last layer: f == 0, so the flow is the identity and
    # log p is the standard normal density of the logit image plus its log-det.
    model = image_model()
    x = images(6)
    got = np_(model.bits_per_dim(x, midpoint=True))
    np.testing.assert_allclose(got, hand_bits_per_dim(x, LEVELS, ALPHA, 0.5), rtol=1e-5)
    # The uniform figure: u ~ U[0, 1) drawn from the evaluation's fixed seed,
    # which a twin draw reproduces.
    u = keras.random.uniform(x.shape, seed=EVALUATION_SEED)
    uniform = np_(model.bits_per_dim(x))
    assert uniform.shape == (6,) and not np.allclose(uniform, got)
    np.testing.assert_allclose(uniform, hand_bits_per_dim(x, LEVELS, ALPHA, np_(u)),
                               rtol=1e-5)


def test_bits_per_dim_needs_levels():
    model = toy_model()
    with pytest.raises(ValueError, match="levels"):
        model.bits_per_dim(toy("8gaussians", 4))


# ------------------------------------------------------------ bad input, sample --


def test_nan_input_is_a_value_error():
    model = toy_model()
    x = toy("8gaussians", 4)
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.log_prob(x)


def test_non_integer_image_is_a_value_error():
    with pytest.raises(ValueError, match="integers"):
        image_model().log_prob(images(2) + 0.5)


def test_sample_shapes(trained):
    model = trained[0]
    samples = np_(model.sample(7))
    assert samples.shape == (7, 2) and np.all(np.isfinite(samples))
    np.testing.assert_array_equal(np_(model.sample(3, seed=4)), np_(model.sample(3, seed=4)))
    image = image_model()
    image(images(1))
    out = np_(image.sample(5))
    assert out.shape == (5, 3, 3, 1)
    assert np.all((out >= 0) & (out <= LEVELS - 1)) and np.all(out == np.round(out))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="positive integer"):
            model.sample(bad)


# ------------------------------------------------------------ saving, export --


def test_keras_save_and_load_keep_log_prob(trained, tmp_path):
    model, x_eval = trained[:2]
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(np_(loaded.log_prob(x_eval[:32])),
                                  np_(model.log_prob(x_eval[:32])))
    assert loaded.blocks[0].eval_solver == model.blocks[0].eval_solver
    assert loaded.get_config()["regularizers"]["kinetic"] == 0.01


def test_keras_save_and_load_keep_image_bits_per_dim(tmp_path):
    model = image_model(zero_init_last=False)
    x = images(4)
    model(x)
    model.save(str(tmp_path / "image.keras"))
    loaded = keras.saving.load_model(str(tmp_path / "image.keras"))
    np.testing.assert_array_equal(np_(loaded.bits_per_dim(x, midpoint=True)),
                                  np_(model.bits_per_dim(x, midpoint=True)))


# Keras writes a SavedModel from TensorFlow and (through jax2tf) from JAX;
# from PyTorch it has no SavedModel export.
exports = pytest.mark.skipif(BACKEND == "torch", reason="Keras exports no SavedModel "
                             "from PyTorch")
# The sample(n) endpoint takes n as a tensor: JAX's static shapes cannot, so
# an archive written from JAX has log_prob only (models/export.py).
EXPORTS_SAMPLE = BACKEND == "tensorflow"


@exports
def test_export_reloads_with_identical_log_prob_and_sample(trained, tmp_path):
    import tensorflow as tf

    model, x_eval = trained[:2]
    path = tmp_path / "exported"
    assert model.export(str(path)) == str(path)
    reloaded = tf.saved_model.load(str(path))
    x = x_eval[:64]
    # The same eval solver and exact trace: deterministic, equal to float32 rounding
    # (the SavedModel runs the graph, model.log_prob eagerly).
    np.testing.assert_allclose(reloaded.log_prob(tf.constant(x)).numpy(),
                               np_(model.log_prob(x)), rtol=1e-5, atol=1e-5)
    # Any batch size: the batch dimension is None.
    assert reloaded.log_prob(tf.constant(x[:3])).shape == (3,)
    if not EXPORTS_SAMPLE:
        assert not hasattr(reloaded, "sample")
    else:
        # sample draws from the saved seed-generator state, as the model does.
        np.testing.assert_allclose(reloaded.sample(tf.constant(5)).numpy(),
                                   np_(model.sample(5)), rtol=1e-5, atol=1e-5)
    assert os.listdir(tmp_path) == ["exported"]  # no staging folder left behind


@exports
def test_export_refuses_to_overwrite_and_a_failed_export_leaves_the_old(trained, tmp_path,
                                                                        monkeypatch):
    model = trained[0]
    path = tmp_path / "exported"
    path.mkdir()
    (path / "keep.txt").write_text("a good model")
    with pytest.raises(FileExistsError, match="overwrite"):
        model.export(str(path))

    def killed(self, filepath, **kwargs):
        with open(os.path.join(filepath, "saved_model.pb"), "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    # keras.export.ExportArchive() returns an instance of a backend class.
    monkeypatch.setattr(type(keras.export.ExportArchive()), "write_out", killed)
    with pytest.raises(KeyboardInterrupt):
        model.export(str(path), overwrite=True)
    assert os.listdir(tmp_path) == ["exported"]
    assert os.listdir(path) == ["keep.txt"]


@exports
def test_export_of_an_image_model_agrees_call_for_call(tmp_path):
    import tensorflow as tf

    # log_prob of images draws dequantization noise from the model's seed
    # generator; the archive saves its state, so both sides draw the same u.
    model = image_model(trace="hutchinson", zero_init_last=False)
    x = images(4)
    model(x)
    model.export(str(tmp_path / "image"))
    reloaded = tf.saved_model.load(str(tmp_path / "image"))
    for _ in range(2):
        np.testing.assert_allclose(reloaded.log_prob(tf.constant(x, tf.float32)).numpy(),
                                   np_(model.log_prob(x)), rtol=1e-5, atol=1e-4)
    if EXPORTS_SAMPLE:
        out = reloaded.sample(tf.constant(3)).numpy()
        assert out.shape == (3, 3, 3, 1) and out.min() >= 0 and out.max() <= LEVELS - 1
