"""Dequantize and LogitTransform layers, and the bits/dim convention."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_rnode.layers.transforms import (
    Dequantize,
    LogitTransform,
    bits_per_dim,
    check_levels,
)


def _ints(shape, levels, seed=0):
    return np.random.default_rng(seed).integers(0, levels, size=shape).astype(np.uint8)


# ---------------------------------------------------------------- check_levels


def test_check_levels_accepts_valid():
    check_levels(_ints((3, 8, 8, 1), 17), 17)
    check_levels(np.array([[0.0, 16.0]]), 17)


@pytest.mark.parametrize(
    "x, match",
    [
        (np.array([[0, 17]]), r"1 value\(s\).*index \(0, 1\)"),
        (np.array([[-1.0, 3.0]]), r"index \(0, 0\)"),
        (np.array([[1.5, 2.0, 2.5]]), r"2 value\(s\)"),
        (np.array([[np.nan, 1.0]]), r"1 value\(s\)"),
        (np.array([[True, False]]), "numeric"),
    ],
)
def test_check_levels_rejects(x, match):
    with pytest.raises(ValueError, match=match):
        check_levels(x, 17)


# ---------------------------------------------------------------- Dequantize


def test_dequantize_range_bins_and_logdet():
    levels = 17
    x = _ints((64, 8, 8, 1), levels)
    y, logdet = Dequantize(levels, seed=0)(x, training=True)
    y = keras.ops.convert_to_numpy(y)
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.all((y >= 0) & (y < 1))
    # Noise never leaves the integer's own bin [x, x + 1) / L.
    np.testing.assert_array_equal(np.floor(y * levels), x)
    u = y * levels - x
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(logdet), np.zeros(64))


def test_dequantize_noise_differs_per_call_and_is_seeded():
    x = _ints((8, 4, 4, 3), 256)
    a, b = Dequantize(seed=3), Dequantize(seed=3)
    a1, a2 = (keras.ops.convert_to_numpy(a(x)[0]) for _ in range(2))
    b1, b2 = (keras.ops.convert_to_numpy(b(x)[0]) for _ in range(2))
    assert not np.array_equal(a1, a2)
    np.testing.assert_array_equal(a1, b1)
    np.testing.assert_array_equal(a2, b2)
    c1 = keras.ops.convert_to_numpy(Dequantize(seed=4)(x)[0])
    assert not np.array_equal(a1, c1)


def test_dequantize_midpoint_options():
    x = _ints((5, 3), 256)
    mid = (x + 0.5) / 256
    plain = Dequantize()
    np.testing.assert_allclose(plain(x, deterministic=True)[0], mid, rtol=1e-6)
    # Evaluation reports the uniform figure by default: noise at inference too.
    assert not np.allclose(plain(x)[0], mid)
    clean = Dequantize(midpoint=True)
    np.testing.assert_allclose(clean(x)[0], mid, rtol=1e-6)
    np.testing.assert_allclose(clean(x, training=False)[0], mid, rtol=1e-6)
    assert not np.allclose(clean(x, training=True)[0], mid)
    assert not np.allclose(clean(x, deterministic=False)[0], mid)


def test_dequantize_stays_below_one_when_noise_rounds_up(monkeypatch):
    # In float32, 255 + (1 - 2**-24) rounds to 256: y would be exactly 1.
    def top(shape, dtype=None, seed=None, **kw):
        return keras.ops.full(shape, 1.0 - 2.0**-24, dtype=dtype)

    monkeypatch.setattr(keras.random, "uniform", top)
    y, _ = Dequantize(256)(np.full((2, 3), 255, np.uint8))
    assert np.all(keras.ops.convert_to_numpy(y) < 1.0)


def test_dequantize_rejects_bad_numpy_input_and_levels():
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        Dequantize(17)(np.array([[0, 17]], np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        Dequantize()(np.array([[0.5, 3.0]], np.float32))
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="levels"):
            Dequantize(bad)


def test_bits_per_dim_convention():
    # A model uniform on [0, 1)^D (log p = 0) spends exactly log2 L bits per dim.
    assert bits_per_dim(0.0, 784, 256) == pytest.approx(8.0)
    # A discrete P(x) dequantized to the piecewise-constant density
    # p(y) = P(floor(L y)) L^D on [0, 1)^D is scored at exactly -log2 P(x) / D:
    # the layer's zero log-det plus bits_per_dim's -log L count L^D once.
    levels, dims = 4, 2
    probs = np.random.default_rng(0).dirichlet(np.ones(levels**dims)).reshape(levels, levels)
    x = _ints((100, dims), levels)
    y, logdet = Dequantize(levels, seed=0)(x)
    cell = np.floor(keras.ops.convert_to_numpy(y) * levels).astype(int)
    log_p_y = np.log(probs[cell[:, 0], cell[:, 1]]) + dims * math.log(levels)
    log_p_y = log_p_y + keras.ops.convert_to_numpy(logdet)
    expected = -np.log2(probs[x[:, 0], x[:, 1]]) / dims
    np.testing.assert_allclose(bits_per_dim(log_p_y, dims, levels), expected, rtol=1e-6)


# ---------------------------------------------------------------- LogitTransform


@pytest.mark.parametrize("alpha", [1e-6, 0.05])
def test_logit_logdet_matches_batch_jacobian(alpha):
    layer = LogitTransform(alpha, dtype="float64")
    x = tf.constant(np.random.default_rng(1).uniform(size=(6, 2, 2, 1)))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y, logdet = layer(x)
    jac = tape.batch_jacobian(y, x).numpy().reshape(6, 4, 4)
    _, expected = np.linalg.slogdet(jac)
    assert logdet.shape == (6,)
    np.testing.assert_allclose(logdet.numpy(), expected, rtol=1e-10, atol=1e-10)


def test_logit_logdet_matches_finite_differences():
    layer = LogitTransform(0.05, dtype="float64")
    x = np.random.default_rng(2).uniform(0.01, 0.99, size=(5, 7))
    h = 1e-6
    # Elementwise map: the Jacobian is diagonal, so log|det| = sum log|dy/dx|.
    dy = (layer(x + h)[0].numpy() - layer(x - h)[0].numpy()) / (2 * h)
    expected = np.log(np.abs(dy)).sum(axis=1)
    np.testing.assert_allclose(layer(x)[1].numpy(), expected, rtol=1e-7)
    np.testing.assert_allclose(
        layer(x)[0].numpy(), np.log((0.05 + 0.9 * x) / (1 - (0.05 + 0.9 * x))), rtol=1e-12
    )


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 2e-6)])
def test_logit_inverse_round_trip(dtype, tol):
    layer = LogitTransform(1e-6, dtype=dtype)
    x = np.random.default_rng(3).uniform(size=(4, 3, 5)).astype(dtype)
    x[0, 0, :2] = [0.0, 1.0]  # the endpoints stay finite thanks to alpha
    y, logdet = layer(x)
    assert np.all(np.isfinite(y)) and logdet.shape == (4,)
    x_back, logdet_inv = layer.inverse(y)
    np.testing.assert_allclose(x_back, x, atol=tol)
    np.testing.assert_allclose(logdet_inv, -np.asarray(logdet), rtol=tol, atol=tol * 100)


def test_logit_inverse_is_finite_for_large_inputs():
    x, logdet = LogitTransform().inverse(np.array([[-200.0, 0.0, 200.0]], np.float32))
    assert np.all(np.isfinite(x)) and np.all(np.isfinite(logdet))


def test_logit_validation():
    for bad in (0.0, 0.5, -0.1):
        with pytest.raises(ValueError, match="alpha"):
            LogitTransform(bad)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        LogitTransform()(np.array([[0.5, 1.5]], np.float32))


# ---------------------------------------------------------------- Keras plumbing


@pytest.mark.parametrize(
    "layer", [Dequantize(17, midpoint=True, seed=5, name="dq"), LogitTransform(0.05)]
)
def test_config_round_trip(layer):
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is type(layer)
    assert restored.get_config() == layer.get_config()


def test_symbolic_model_shapes():
    inputs = keras.Input((8, 8, 1), dtype="uint8")
    y, ld_dq = Dequantize(17)(inputs)
    z, ld_logit = LogitTransform()(y)
    model = keras.Model(inputs, [z, ld_dq + ld_logit])
    assert tuple(model.outputs[0].shape) == (None, 8, 8, 1)
    assert tuple(model.outputs[1].shape) == (None,)
    z_out, ld = model(_ints((3, 8, 8, 1), 17))
    assert z_out.shape == (3, 8, 8, 1) and ld.shape == (3,)

