"""The multiscale RNODE (FFJORD's ODENVP): shapes, log-det, invertibility, bits/dim, saving.

Tiny images (4x4 and 8x8) and thin dynamics keep this file fast; the
log-det is checked against a finite-difference Jacobian in float64 with
the exact trace, on dynamics whose last layer is not zero (a fresh,
zero-initialized flow is the identity and would prove nothing).
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.stats import norm

import keras_rnode as kr
from keras_rnode.layers import CNF, ConcatConvNet, LogitTransform, squeeze, unsqueeze
from keras_rnode.models.multiscale import MultiscaleRNODE, default_scales
from tests.backend_utils import build_optimizer

ALPHA = 0.05


def tiny_model(n_scales=2, per=1, levels=None, dtype="float64", seed=0, **cnf):
    """A 4x4x1 model whose dynamics are far from zero, every solve deterministic."""
    keras.utils.set_random_seed(seed)
    cnf = {"trace": "exact", "method": "rk4", "step_size": 1 / 32, **cnf}
    blocks = [
        CNF(ConcatConvNet(channels=(8,), zero_init_last=False, dtype=dtype), dtype=dtype,
            **cnf)
        for _ in range((2 * n_scales - 1) * per)]
    model = MultiscaleRNODE(blocks, n_scales, levels=levels, logit_alpha=ALPHA, dtype=dtype)
    model.build((None, 4, 4, 1))
    return model


def flat(latents):
    return np.concatenate([np.reshape(z, (z.shape[0], -1)) for z in latents], axis=1)


def test_squeeze_is_space_to_depth_and_unsqueeze_inverts_it():
    x = np.random.default_rng(0).normal(size=(3, 6, 4, 2)).astype("float32")
    y = squeeze(x)
    np.testing.assert_array_equal(y, tf.nn.space_to_depth(x, 2))
    np.testing.assert_array_equal(unsqueeze(y), x)
    with pytest.raises(ValueError, match="divisible"):
        squeeze(np.zeros((1, 5, 4, 1), "float32"))


@pytest.mark.parametrize("shape, scales, latents", [
    ((28, 28, 1), 3, [(14, 14, 2), (7, 7, 4), (7, 7, 4)]),              # MNIST
    ((32, 32, 3), 4, [(16, 16, 6), (8, 8, 12), (4, 4, 24), (4, 4, 24)]),  # CIFAR-10
    ((8, 8, 1), 2, [(4, 4, 2), (4, 4, 2)]),                               # digits
])
def test_architecture_shapes(shape, scales, latents):
    model = kr.multiscale_rnode(shape, channels=(4,))
    assert model.n_scales == default_scales(*shape[:2]) == scales
    # Two blocks before and two after each squeeze, two at the last scale.
    assert len(model.blocks) == 4 * (scales - 1) + 2
    assert model.latent_shapes == latents
    assert sum(math.prod(s) for s in latents) == math.prod(shape)
    # After each squeeze the blocks see four times the channels, then half go.
    channels = [b.dynamics._z_shape[-1] for b in model.blocks]
    assert channels[:4] == [shape[-1]] * 2 + [4 * shape[-1]] * 2


def test_forward_shapes_and_log_prob_per_sample():
    model = tiny_model(dtype="float32", step_size=0.5)
    y = np.random.default_rng(1).uniform(0.1, 0.9, (5, 4, 4, 1)).astype("float32")
    latents, logdet, _ = model.encode(y)
    assert [tuple(z.shape) for z in latents] == [(5, 2, 2, 2), (5, 2, 2, 2)]
    assert tuple(logdet.shape) == (5,)
    assert tuple(model.log_prob(y).shape) == (5,)


def test_log_det_matches_a_brute_force_jacobian():
    model = tiny_model()
    fn = tf.function(lambda v: model.encode(v))
    y = np.random.default_rng(2).uniform(0.2, 0.8, (1, 4, 4, 1))
    d, h = y.size, 1e-6
    # Every perturbed image in one batch: rows are independent.
    steps = np.eye(d).reshape(d, 4, 4, 1) * h
    batch = np.concatenate([y, y + steps, y - steps])
    latents, logdet, _ = fn(tf.constant(batch))
    z = flat([t.numpy() for t in latents])
    jac = (z[1:d + 1] - z[d + 1:]).T / (2 * h)
    sign, brute = np.linalg.slogdet(jac)
    assert sign != 0
    assert abs(brute) > 0.5  # the map is far from volume-preserving
    np.testing.assert_allclose(logdet.numpy()[0], brute, rtol=1e-6, atol=1e-6)


def test_inverse_recovers_the_input_and_samples_are_images():
    model = tiny_model(method="dopri5", rtol=1e-9, atol=1e-9, step_size=None)
    y = np.random.default_rng(3).uniform(0.1, 0.9, (3, 4, 4, 1))
    latents, log_det, _ = model.encode(y)
    back, back_log_det = model.decode(latents)
    assert np.max(np.abs(flat(latents) - y.reshape(3, -1))) > 0.1
    np.testing.assert_allclose(back.numpy(), y, atol=1e-6)
    # The generative direction's log-det is the density direction's, negated.
    np.testing.assert_allclose(back_log_det.numpy(), -log_det.numpy(), rtol=1e-6)

    image_model = tiny_model(levels=17, dtype="float32", step_size=0.5)
    samples = image_model.sample(6, seed=1).numpy()
    assert samples.shape == (6, 4, 4, 1)
    assert samples.min() >= 0 and samples.max() <= 16
    np.testing.assert_array_equal(samples, np.round(samples))


def test_bits_per_dim_is_the_sum_of_its_parts():
    """Logit log-det, every block's delta_logp and every factored-out part, computed apart."""
    model = tiny_model(levels=17, step_size=0.25)
    x = np.random.default_rng(4).integers(0, 17, (4, 4, 4, 1)).astype("float64")
    bpd = model.bits_per_dim(x, midpoint=True).numpy()

    h, logdet = LogitTransform(ALPHA, dtype="float64")((x + 0.5) / 17)
    logdet = logdet.numpy()
    b0, b1, b2 = model.blocks
    h, d, _ = b0(h)
    logdet -= d.numpy()
    h, d, _ = b1(squeeze(h))
    logdet -= d.numpy()
    factored, h = h[..., 2:], h[..., :2]
    h, d, _ = b2(h)
    logdet -= d.numpy()
    base = sum(norm.logpdf(np.reshape(z, (4, -1))).sum(axis=1) for z in (factored, h))
    expected = -((base + logdet) / 16 - math.log(17)) / math.log(2)
    np.testing.assert_allclose(bpd, expected, rtol=1e-9)
    # The factored-out part carries real weight: leaving it out would show.
    assert np.min(np.abs(norm.logpdf(np.reshape(factored, (4, -1))).sum(axis=1))) > 1


def test_fit_logs_every_blocks_statistics_and_reduces_the_loss():
    model = kr.multiscale_rnode((4, 4, 1), channels=(8,), blocks_per_scale=1, n_scales=2,
                                levels=17, method="rk4", step_size=0.5, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=False)
    build_optimizer(model)
    x = np.random.default_rng(5).integers(0, 17, (32, 4, 4, 1)).astype("float32")
    data = kr.datasets.make_dataset(x, 16, shuffle=False, repeat=True)
    history = model.fit(data, epochs=4, steps_per_epoch=2, verbose=0).history
    for key in ("loss", "bpd", "kinetic", "jacobian", "nfe"):
        assert np.all(np.isfinite(history[key])), key
    # rk4 at step 0.5: 2 steps of 4 stages in each of the three blocks.
    assert history["nfe"][-1] == 8 * len(model.blocks)
    assert history["kinetic"][-1] > 0
    assert history["bpd"][-1] < history["bpd"][0]


def test_save_and_load_keep_the_architecture_and_the_numbers(tmp_path):
    model = tiny_model(levels=17, dtype="float32", step_size=0.5)
    x = np.random.default_rng(6).integers(0, 17, (3, 4, 4, 1)).astype("float32")
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    assert type(loaded) is MultiscaleRNODE
    assert (loaded.n_scales, len(loaded.blocks)) == (2, 3)
    np.testing.assert_allclose(loaded.bits_per_dim(x, midpoint=True),
                               model.bits_per_dim(x, midpoint=True), rtol=1e-6)


def test_bad_arrangements_are_refused():
    with pytest.raises(ValueError, match="blocks"):
        MultiscaleRNODE([CNF(ConcatConvNet(channels=(4,))) for _ in range(2)], n_scales=2)
    model = MultiscaleRNODE([CNF(ConcatConvNet(channels=(4,))) for _ in range(3)], n_scales=2)
    with pytest.raises(ValueError, match="divisible"):
        model.build((None, 5, 4, 1))
