"""Conditional flows and a trainable integration time, under every Keras backend.

- The context of a conditional CNF gets its true gradient (float64 central
  differences), with the adjoint and the direct gradient.
- A class-conditional RNODE fits on (x, context) pairs, scores and samples
  given the context, saves and loads, and says clearly when the context is
  missing or of the wrong shape.
- A CNF with train_T gets dL/dT through the solve's end time (finite
  differences again) and learns T in `fit`.
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_rnode as kr
from keras_rnode.evaluation import evaluate_model
from tests.backend_utils import BACKEND, gradients, np_

pytestmark = pytest.mark.backends

GRADIENTS = ("adjoint", "direct")
CLASSES = 8


def float64_cnf(gradient, seed, **kwargs):
    """A float64 CNF with exact trace and tight dopri5, weights drawn with NumPy."""
    net = kr.layers.ConcatSquashMLP(hidden=(6,), zero_init_last=False, dtype="float64",
                                    **kwargs.pop("net", {}))
    cnf = kr.layers.CNF(net, trace="exact", rtol=1e-10, atol=1e-10, gradient=gradient,
                        dtype="float64", **kwargs)
    cnf.build((None, 2))
    rng = np.random.default_rng(seed)
    for v in net.weights:
        v.assign(rng.uniform(-0.7, 0.7, v.shape).astype("float64"))
    return cnf


def central_difference(value, point, h=1e-5):
    grad = np.zeros(point.shape)
    for j in np.ndindex(point.shape):
        up, down = point.copy(), point.copy()
        up[j] += h
        down[j] -= h
        grad[j] = (value(up) - value(down)) / (2 * h)
    return grad


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_context_gradient_matches_finite_differences(gradient):
    # dL/dcontext reaches an encoder through the solve's args; checked for
    # both outputs of the flow, z and delta_logp.
    cnf = float64_cnf(gradient, seed=1, net=dict(context_dim=2))
    x = np.random.default_rng(2).normal(size=(2, 2))
    context = np.random.default_rng(3).normal(size=(2, 2))
    wz = np.random.default_rng(4).normal(size=(2, 2))

    def loss(c):
        z, delta, _ = cnf(ops.convert_to_tensor(x, "float64"), context=c)
        return ops.sum(ops.convert_to_tensor(wz, "float64") * z) + ops.sum(delta)

    _, (g,), _ = gradients(loss, [ops.convert_to_tensor(context, "float64")])
    fd = central_difference(
        lambda c: float(np_(loss(ops.convert_to_tensor(c, "float64")))), context)
    assert np.abs(fd).max() > 1e-2  # the context matters
    np.testing.assert_allclose(np_(g), fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_trainable_end_time_gradient_matches_finite_differences(gradient):
    cnf = float64_cnf(gradient, seed=5, T=0.8, train_T=True)
    x = ops.convert_to_tensor(np.random.default_rng(6).normal(size=(5, 2)), "float64")

    def loss():
        z, delta, _ = cnf(x)
        return ops.sum(ops.square(z)) + ops.sum(delta)

    _, _, (g,) = gradients(loss, [], [cnf.sqrt_T])
    s = float(np_(cnf.sqrt_T))
    np.testing.assert_allclose(s * s, 0.8, rtol=1e-12)

    def value(point):
        cnf.sqrt_T.assign(point[()])
        return float(np_(loss()))

    fd = central_difference(value, np.array(s))
    cnf.sqrt_T.assign(s)
    assert abs(fd) > 1e-2
    np.testing.assert_allclose(np_(g), fd, rtol=1e-6)


def eight_gaussians(n, seed):
    x, label = kr.datasets.toy("8gaussians", n, seed=seed, labels=True)
    return x, np.eye(CLASSES, dtype="float32")[label]


def conditional_model(seed=0):
    keras.utils.set_random_seed(seed)
    net = kr.layers.ConcatSquashMLP(hidden=(16, 16), context_dim=CLASSES)
    cnf = kr.layers.CNF(net, trace="exact", method="rk4", step_size=0.25,
                        gradient="direct", seed=seed)
    return kr.RNODE([cnf], kinetic=0.01, jacobian=0.01, seed=seed)


def given_label_nll(model, x, c):
    return float(-np.mean(np_(model.log_prob(x, c))))


def test_conditional_model_fits_scores_samples_and_saves(tmp_path):
    x, c = eight_gaussians(1024, seed=0)
    x_test, c_test = eight_gaussians(256, seed=1)
    model = conditional_model()
    assert model.conditional
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=BACKEND == "jax")
    before = given_label_nll(model, x_test, c_test)
    model.fit(x, c, batch_size=256, epochs=2, verbose=0)
    model.fit((x, c), batch_size=256, epochs=1, verbose=0)  # the pair as one input too
    if BACKEND == "tensorflow":  # and a tf.data pipeline of pairs
        import tensorflow as tf

        model.fit(tf.data.Dataset.from_tensor_slices((x, c)).batch(256), verbose=0)
    after = given_label_nll(model, x_test, c_test)
    assert after < before - 0.5, (before, after)
    # The context matters: the right labels score better than shuffled ones.
    wrong = given_label_nll(model, x_test, np.roll(c_test, 1, axis=0))
    assert wrong > after + 0.1, (after, wrong)

    result = evaluate_model(model, x_test, batch_size=100, context=c_test)
    np.testing.assert_allclose(result["nll"], after, rtol=1e-4)
    assert np_(model.sample(7, c_test[:7])).shape == (7, 2)
    assert np_(model.sample(3, c_test[0])).shape == (3, 2)  # one context for all

    path = tmp_path / "conditional.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    np.testing.assert_allclose(np_(loaded.log_prob(x_test[:9], c_test[:9])),
                               np_(model.log_prob(x_test[:9], c_test[:9])), rtol=1e-6)


def test_missing_or_misshapen_context_is_a_clear_error():
    model = conditional_model()
    x, c = eight_gaussians(4, seed=0)
    with pytest.raises(ValueError, match="conditional.*context"):
        model.log_prob(x)
    with pytest.raises(ValueError, match=r"context must be \(batch, 8\)"):
        model.log_prob(x, c[:, :3])
    with pytest.raises(ValueError, match="context"):
        evaluate_model(model, x, batch_size=2)
    unconditional = kr.RNODE([kr.layers.CNF(kr.layers.ConcatSquashMLP(hidden=(4,)))])
    with pytest.raises(ValueError, match="takes no context"):
        unconditional.log_prob(x, c)
    with pytest.raises(ValueError, match="takes no context"):
        kr.layers.ConcatConvNet(channels=(4,), context_dim=3)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the full SavedModel is TensorFlow's")
def test_conditional_export_takes_the_context(tmp_path):
    import tensorflow as tf

    model = conditional_model()
    x, c = eight_gaussians(6, seed=2)
    expected = np_(model.log_prob(x, c))
    reloaded = tf.saved_model.load(model.export(str(tmp_path / "exported")))
    np.testing.assert_allclose(reloaded.log_prob(x, c).numpy(), expected, rtol=1e-5,
                               atol=1e-5)
    assert reloaded.sample(c[:4]).shape == (4, 2)


def test_fit_learns_the_integration_time():
    keras.utils.set_random_seed(0)
    cnf = kr.layers.CNF(kr.layers.ConcatSquashMLP(hidden=(16,)), trace="exact", T=0.5,
                        train_T=True, method="rk4", step_size=0.25, gradient="direct")
    model = kr.RNODE([cnf])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=BACKEND == "jax")
    model.fit(kr.datasets.toy("8gaussians", 512, seed=0), batch_size=256, epochs=2, verbose=0)
    assert abs(float(np_(cnf.end_time)) - 0.5) > 1e-3
    clone = kr.layers.CNF.from_config(cnf.get_config())
    assert clone.train_T and clone.T == 0.5
