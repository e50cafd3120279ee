"""The TensorFlow Probability face (keras_rnode.distributions): the model's numbers through TFP.

Every model here has the exact trace, so each log p is deterministic, and
dynamics whose last layer is not zero (a zero-initialized flow is the
identity and would prove nothing). TensorFlow only, like TFP.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from scipy.stats import norm

if keras.backend.backend() != "tensorflow":
    # The module under test refuses to import elsewhere (its own test says so).
    pytest.skip("the TFP face needs the TensorFlow backend", allow_module_level=True)

import keras_rnode as kr  # noqa: E402
from keras_rnode import distributions  # noqa: E402
from keras_rnode.distributions import RNODEBijector, as_distribution  # noqa: E402
from keras_rnode.layers import CNF, ConcatConvNet, ConcatSquashMLP  # noqa: E402
from keras_rnode.models.multiscale import MultiscaleRNODE  # noqa: E402


def toy_model(dtype="float32", **solver):
    """Two 2-D blocks with random weights; dopri5 at 1e-5 unless told."""
    keras.utils.set_random_seed(0)
    solver = solver or {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5}
    blocks = [CNF(ConcatSquashMLP(hidden=(16, 16), zero_init_last=False, dtype=dtype),
                  trace="exact", dtype=dtype, **solver) for _ in range(2)]
    model = kr.RNODE(blocks, dtype=dtype)
    model.build((None, 2))
    # Glorot's weights alone make a nearly volume-preserving flow here.
    for weight in model.trainable_variables:
        weight.assign(2.5 * weight)
    return model


def tiny_multiscale(levels=None, dtype="float32", **solver):
    """4x4x1 images, two scales of one block each: three blocks, two latent parts."""
    keras.utils.set_random_seed(1)
    solver = solver or {"method": "rk4", "step_size": 0.5}
    blocks = [CNF(ConcatConvNet(channels=(8,), zero_init_last=False, dtype=dtype),
                  trace="exact", dtype=dtype, **solver) for _ in range(3)]
    model = MultiscaleRNODE(blocks, 2, levels=levels, logit_alpha=0.05, dtype=dtype)
    model.build((None, 4, 4, 1))
    return model


def points(n, seed=0):
    return kr.datasets.toy("pinwheel", n, seed=seed)


def fresh(t):
    # A new tensor: TFP's cache, keyed by the tensor, must not answer.
    return tf.constant(np.asarray(t))


def test_log_prob_equals_the_models_and_takes_any_batch_shape(monkeypatch):
    model = toy_model()
    dist = model.as_distribution()
    assert isinstance(dist, tfp.distributions.TransformedDistribution)
    assert isinstance(dist.bijector, RNODEBijector)
    assert (tuple(dist.event_shape), dist.dtype) == ((2,), tf.float32)
    x = points(128)
    # One pass of the model's solves gives both z and the log-det.
    passes, encode = [], model._encode
    monkeypatch.setattr(model, "_encode", lambda *a, **k: passes.append(1) or encode(*a, **k))
    log_p = dist.log_prob(x).numpy()
    assert len(passes) == 1
    np.testing.assert_allclose(log_p, model.log_prob(x).numpy(), rtol=0, atol=1e-5)
    # The flow is far from the identity: log p is not the base's.
    assert np.mean(np.abs(log_p - norm.logpdf(x).sum(axis=1))) > 0.5
    # Sample shapes: one event, and a (2, 3) batch of them. (Against the model
    # on the same rows: dopri5's steps depend on the whole batch.)
    np.testing.assert_allclose(dist.log_prob(x[0]).numpy(), model.log_prob(x[:1]).numpy()[0],
                               rtol=0, atol=1e-5)
    grid = dist.log_prob(np.reshape(x[:6], (2, 3, 2))).numpy()
    np.testing.assert_allclose(grid, np.reshape(model.log_prob(x[:6]), (2, 3)), rtol=0,
                               atol=1e-5)


def check_inverse_and_log_dets(bijector, z, atol):
    """inverse(forward(z)) = z, and fldj(z) = -ildj(x), each log-det from its value's solves."""
    blocks = bijector.model.blocks
    z = tf.constant(z)
    x = bijector.forward(z)
    assert np.max(np.abs(x.numpy() - z.numpy())) > 0.1
    # A sentinel in the solve counters: the log-det query must not solve again.
    blocks[0].stats["nfe"].assign(-1)
    fldj = bijector.forward_log_det_jacobian(z, event_ndims=len(z.shape) - 1).numpy()
    assert int(blocks[0].stats["nfe"]) == -1
    x = fresh(x)  # so that the inverse solves, rather than TFP's cache answering
    np.testing.assert_allclose(bijector.inverse(x).numpy(), z.numpy(), rtol=0, atol=atol)
    ildj = bijector.inverse_log_det_jacobian(x, event_ndims=len(x.shape) - 1).numpy()
    # log |det dx/dz| from the inverse solves, log |det dz/dx| from the forward ones.
    assert np.mean(np.abs(fldj)) > 0.1
    np.testing.assert_allclose(fldj, -ildj, rtol=0, atol=atol)


def test_bijector_inverts_and_its_log_dets_are_opposite():
    model = toy_model("float64", method="dopri5", rtol=1e-7, atol=1e-7)
    check_inverse_and_log_dets(RNODEBijector(model),
                               np.random.default_rng(1).normal(size=(16, 2)), atol=1e-6)


def test_samples_have_the_models_moments():
    model = toy_model(method="rk4", step_size=0.25)
    dist = as_distribution(model)
    n = 4000
    ours = dist.sample(n, seed=(1, 2)).numpy()
    theirs = model.sample(n, seed=3).numpy()
    # Each estimate's standard error from the samples themselves (the pair are
    # independent), so the bound holds for whatever shape the flow has.
    for stat in (lambda s: s, lambda s: np.einsum("ni,nj->nij", s - s.mean(0), s - s.mean(0))):
        a, b = stat(ours), stat(theirs)
        error = np.sqrt(a.var(axis=0) / n + b.var(axis=0) / n)
        assert np.all(np.abs(a.mean(axis=0) - b.mean(axis=0)) < 5 * error)
    # The same noise gives the model's very samples: the same map, not just the same law.
    z = keras.random.normal((n, 2), dtype="float32", seed=3)
    np.testing.assert_allclose(dist.bijector.forward(z).numpy(), theirs, rtol=0, atol=1e-5)


def test_every_call_follows_the_current_weights():
    """Nothing a call leaves in TFP's cache may answer the next one."""
    model = toy_model(method="rk4", step_size=0.25)
    dist = model.as_distribution()
    x = tf.constant(points(64, seed=2))
    before = dist.log_prob(x).numpy()
    sample = dist.sample(64, seed=(3, 4))
    # The coarse rk4 solve back from z is not the forward solve's inverse:
    # the sample's log p must come from a fresh forward solve, as the model's does.
    np.testing.assert_allclose(dist.log_prob(sample).numpy(), model.log_prob(sample).numpy(),
                               rtol=0, atol=1e-5)
    for v in model.trainable_variables:
        v.assign(1.1 * v)
    after = dist.log_prob(x).numpy()
    assert np.max(np.abs(after - before)) > 0.05
    np.testing.assert_allclose(after, model.log_prob(x).numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(dist.log_prob(sample).numpy(), model.log_prob(sample).numpy(),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("levels", [None, 17])
def test_multiscale_and_image_models(levels):
    model = tiny_multiscale(levels)
    dist = model.as_distribution()
    assert tuple(dist.event_shape) == (4, 4, 1)
    rng = np.random.default_rng(4)
    if levels:
        # The distribution is over the dequantized y: the midpoint figure's y here.
        x = rng.integers(0, levels, (8, 4, 4, 1)).astype("float32")
        y = (x + 0.5) / levels
        bpd = model.bits_per_dim(x, midpoint=True).numpy().astype("float64")
        expected = 16 * (math.log(levels) - bpd * math.log(2.0))
    else:
        y = rng.uniform(0.05, 0.95, (8, 4, 4, 1)).astype("float32")
        expected = model.log_prob(y).numpy()
    np.testing.assert_allclose(dist.log_prob(y).numpy(), expected, rtol=0, atol=1e-5)
    # The latent: the model's parts, each flattened, in _latent_shapes order.
    latents = model._encode(tf.constant(y))[0]
    assert len(latents) == 2
    packed = np.concatenate([np.reshape(part, (8, -1)) for part in latents], axis=1)
    z = dist.bijector.inverse(fresh(y)).numpy()
    np.testing.assert_allclose(np.reshape(z, (8, -1)), packed, rtol=0, atol=1e-6)
    # Samples are continuous y, not the model's grey levels.
    samples = dist.sample(4, seed=(5, 6)).numpy()
    assert samples.shape == (4, 4, 4, 1)
    assert np.all((samples > -0.06) & (samples < 1.06))
    assert not np.allclose(samples * 17, np.round(samples * 17))


def test_multiscale_bijector_inverts():
    model = tiny_multiscale(dtype="float64", method="dopri5", rtol=1e-7, atol=1e-7)
    check_inverse_and_log_dets(RNODEBijector(model),
                               np.random.default_rng(5).normal(size=(2, 4, 4, 1)), atol=1e-6)


def test_models_it_cannot_represent_are_refused(monkeypatch):
    with pytest.raises(TypeError, match="RNODE"):
        RNODEBijector(keras.Sequential([keras.layers.Dense(2)]))
    unbuilt = kr.RNODE([CNF(ConcatSquashMLP(hidden=(4,)), trace="exact")])
    with pytest.raises(ValueError, match="built"):
        unbuilt.as_distribution()
    conditional = kr.RNODE([CNF(ConcatSquashMLP(hidden=(4,), context_dim=3), trace="exact")])
    conditional.build(((None, 2), (None, 3)))
    with pytest.raises(ValueError, match="context"):
        as_distribution(conditional)
    with pytest.raises(ValueError, match="event shape"):
        RNODEBijector(toy_model()).inverse(np.zeros((4, 3), "float32"))
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ImportError, match="needs the TensorFlow backend"):
        distributions.require_tensorflow()
