"""Penalties by name (`keras_rnode.regularizers`), against closed forms and finite differences.

- Each built-in on a linear time-dependent field f = A z + b t (A not
  symmetric, so J f and f^T J differ): the CNF's integrals equal a float64
  scipy solve of the augmented ODE.
- The training gradient of each penalty (adjoint and direct) through a
  nonlinear net equals float64 finite differences.
- A registered penalty equals its built-in twin; unknown names, both forms
  of RNODE's weights, bad shapes and reserved names are clear errors;
  .keras and config round trips keep the dict; a model saved with a penalty
  of the user's own says which name to register.
- Penalties of weight 0 are not integrated: the losses of a seeded run are
  those recorded before named regularizers existed.

Runs under every Keras backend.
"""

import keras
import numpy as np
import pytest
from keras import ops
from scipy import integrate

import keras_rnode as kr
from keras_rnode import regularizers
from keras_rnode.layers import CNF
from tests.backend_utils import BACKEND, f64, gradients, np_
from tests.test_cnf import make_net

pytestmark = pytest.mark.backends

A = np.array([[-0.4, 0.9, 0.1],
              [-0.3, -0.2, -0.5],
              [0.6, 0.1, -0.3]])
B = np.array([0.5, -1.0, 0.25])
T = 0.8


class Affine(keras.layers.Layer):
    """f(t, z) = A z + b t, rows of z being samples."""

    def __init__(self, **kwargs):
        super().__init__(dtype="float64", **kwargs)

    def call(self, t, z):
        a = ops.convert_to_tensor(A.T, z.dtype)
        return kr.backend.matmul(z, a) + ops.convert_to_tensor(B, z.dtype) * t


def augmented_reference(x):
    """The built-ins' integrals over [0, T] by a float64 scipy solve of the augmented ODE."""
    dim = len(B)

    def rhs(t, y):
        z = y[:dim]
        f = A @ z + B * t
        jf = A @ f
        return np.concatenate([f, [0.5 * np.mean(f**2), np.sum(A**2) / dim,
                                   0.5 * np.mean(jf**2), 0.5 * np.mean((B + jf)**2)]])

    out = []
    for xi in x:
        sol = integrate.solve_ivp(rhs, (0.0, T), np.concatenate([xi, np.zeros(4)]),
                                  method="DOP853", rtol=1e-13, atol=1e-13)
        out.append(sol.y[dim:, -1])
    return dict(zip(regularizers.BUILTINS, np.array(out).T))


def test_builtins_match_the_augmented_ode_on_a_linear_time_dependent_field():
    x = np.random.default_rng(0).normal(size=(5, 3))
    cnf = CNF(Affine(), trace="exact", rtol=1e-10, atol=1e-10, T=T, dtype="float64")
    out = cnf(f64(x), training=True, penalties=regularizers.BUILTINS)
    assert set(out.penalties) == set(regularizers.BUILTINS)
    expected = augmented_reference(x)
    for name in regularizers.BUILTINS:
        np.testing.assert_allclose(np_(out.penalties[name]), expected[name], rtol=1e-8,
                                   err_msg=name)
    # The forward product is J f, not the reference code's f^T J: they differ here.
    assert not np.allclose(expected["directional"], _transposed_directional(x), rtol=1e-3)


def _transposed_directional(x):
    """0.5 * mean (A^T f)^2 integrated: what f^T J would give."""
    dim = len(B)

    def rhs(t, y):
        f = A @ y[:dim] + B * t
        return np.concatenate([f, [0.5 * np.mean((A.T @ f) ** 2)]])

    return np.array([integrate.solve_ivp(rhs, (0.0, T), np.append(xi, 0.0), rtol=1e-12,
                                         atol=1e-12).y[dim, -1] for xi in x])


def test_hutchinson_jacobian_penalty_is_the_probe_estimate():
    x = np.random.default_rng(1).normal(size=(6, 3))
    cnf = CNF(Affine(), trace="hutchinson", rtol=1e-10, atol=1e-10, T=T, seed=4,
              dtype="float64")
    drawn = []
    draw = cnf._noise
    cnf._noise = lambda x_: drawn.append(draw(x_)) or drawn[-1]
    out = cnf(f64(x), training=True, penalties=("jacobian", "kinetic"))
    eps = np_(drawn[0])
    # T |J eps|^2 / D (forward mode) or T |eps^T J|^2 / D (reverse mode, TF and torch).
    forward_mode, reverse_mode = (T * np.mean((eps @ m) ** 2, axis=1) for m in (A.T, A))
    jac = np_(out.penalties["jacobian"])
    assert (np.allclose(jac, forward_mode, rtol=1e-9)
            or np.allclose(jac, reverse_mode, rtol=1e-9))
    np.testing.assert_allclose(np_(out.penalties["kinetic"]),
                               augmented_reference(x)["kinetic"], rtol=1e-8)


# total_derivative's product includes directional's; each gradient method once.
@pytest.mark.parametrize("name, gradient", [("directional", "direct"),
                                            ("total_derivative", "adjoint")])
def test_penalty_gradients_match_finite_differences(name, gradient):
    """d/d(x, weights) of a penalty's integral through a nonlinear net, along a random
    direction of both at once, against a float64 central difference."""
    net = make_net(2, hidden=(6,), seed=5, scale=2.0)
    cnf = CNF(net, trace="exact", method="dopri5", rtol=1e-9, atol=1e-9,
              gradient=gradient, dtype="float64")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 2))
    weights = net.trainable_variables
    base = [np_(w) for w in weights]
    dx = rng.normal(size=x.shape)
    dw = [rng.normal(size=b.shape) for b in base]

    def loss(x_):
        return ops.sum(cnf(x_, training=True, penalties=(name,)).penalties[name])

    value, (grad_x,), grads_w = gradients(loss, [f64(x)], weights)
    assert float(np_(value)) > 0
    analytic = np.sum(np_(grad_x) * dx) + sum(np.sum(np_(g) * d) for g, d in zip(grads_w, dw))
    h = 1e-5
    moved = []
    for sign in (1, -1):
        for w, b, d in zip(weights, base, dw):
            w.assign(b + sign * h * d)
        moved.append(float(np_(loss(f64(x + sign * h * dx)))))
    for w, b in zip(weights, base):
        w.assign(b)
    np.testing.assert_allclose(analytic, (moved[0] - moved[1]) / (2 * h), rtol=1e-5)


def test_a_registered_penalty_equals_its_builtin_twin(monkeypatch):
    monkeypatch.setattr(regularizers, "_REGISTRY", dict(regularizers._REGISTRY))

    @regularizers.register("my_kinetic")
    def my_kinetic(inputs):
        return 0.5 * regularizers.event_mean(ops.square(inputs.f))

    assert regularizers.get("my_kinetic") is my_kinetic
    x = np.random.default_rng(3).normal(size=(4, 3))
    cnf = CNF(Affine(), trace="exact", rtol=1e-10, atol=1e-10, T=T, dtype="float64")
    out = cnf(f64(x), training=True, penalties=("kinetic", "my_kinetic"))
    np.testing.assert_allclose(np_(out.penalties["my_kinetic"]),
                               np_(out.penalties["kinetic"]), rtol=1e-12)


@pytest.mark.parametrize("make, match", [
    (lambda: regularizers.get("speed"), r"unknown penalty 'speed'.*'kinetic'.*register"),
    (lambda: regularizers.register("kinetic", len), "built-in"),
    (lambda: regularizers.register("nfe", len), "metric"),
    (lambda: regularizers.register("two words", len), "identifier"),
    (lambda: kr.RNODE([CNF(Affine())], regularizers={"speed": 1.0}), "unknown penalty"),
    (lambda: kr.RNODE([CNF(Affine())], regularizers={"kinetic": -1.0}), "kinetic must be"),
    (lambda: kr.RNODE([CNF(Affine())], kinetic=0.1, regularizers={"kinetic": 0.1}),
     "not both"),
])
def test_bad_names_and_weights_are_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_penalty_must_give_one_value_per_sample(monkeypatch):
    monkeypatch.setattr(regularizers, "_REGISTRY", dict(regularizers._REGISTRY))
    regularizers.register("total", lambda inputs: ops.sum(inputs.f))
    cnf = CNF(Affine(), trace="exact", dtype="float64")
    with pytest.raises(ValueError, match="'total' returned shape"):
        cnf(f64(np.ones((4, 3))), training=True, penalties=("total",))


def toy_model(**weights):
    net = kr.layers.ConcatSquashMLP(hidden=(8,))
    return kr.RNODE([CNF(net, trace="exact", method="rk4", step_size=0.5)], **weights)


def test_the_shorthand_and_the_dict_round_trip(tmp_path):
    assert toy_model().regularizers == {"kinetic": 0.01, "jacobian": 0.01}
    assert toy_model(kinetic=0.5).regularizers == {"kinetic": 0.5, "jacobian": 0.01}
    model = toy_model(regularizers={"kinetic": 0.02, "directional": 0.1, "jacobian": 0.0})
    assert model.trained_penalties == ("kinetic", "directional")
    assert (model.kinetic, model.jacobian) == (0.02, 0.0)
    clone = kr.RNODE.from_config(model.get_config())
    assert clone.regularizers == model.regularizers
    x = kr.datasets.toy("8gaussians", 8, seed=0)
    model(x)
    path = str(tmp_path / "m.keras")
    model.save(path)
    assert keras.saving.load_model(path).regularizers == model.regularizers
    # Configs from before named regularizers.
    old = model.get_config()
    del old["regularizers"]
    old.update(kinetic=0.3, jacobian=0.2)
    assert kr.RNODE.from_config(old).regularizers == {"kinetic": 0.3, "jacobian": 0.2}


def test_a_model_with_a_users_penalty_loads_only_where_it_is_registered(tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr(regularizers, "_REGISTRY", dict(regularizers._REGISTRY))
    regularizers.register("speed", lambda inputs: ops.sqrt(ops.sum(ops.square(inputs.f), -1)))
    model = toy_model(regularizers={"kinetic": 0.01, "speed": 0.1})
    x = kr.datasets.toy("8gaussians", 64, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(x, batch_size=32, epochs=1, verbose=0).history
    assert {"kinetic", "speed"} <= set(history) and "jacobian" not in history
    path = str(tmp_path / "m.keras")
    model.save(path)
    assert keras.saving.load_model(path).regularizers == {"kinetic": 0.01, "speed": 0.1}
    del regularizers._REGISTRY["speed"]
    with pytest.raises(Exception, match=r"register\('speed', fn\)"):
        keras.saving.load_model(path)


def test_model_penalties_integrate_any_registered_penalty_over_every_block():
    x = np.random.default_rng(4).normal(size=(4, 3))
    blocks = [CNF(Affine(), trace="exact", rtol=1e-10, atol=1e-10, T=T, dtype="float64",
                  gradient="none")]
    model = kr.RNODE(blocks, kinetic=0.0, jacobian=0.0, dtype="float64")
    values = model.penalties(f64(x), names=regularizers.BUILTINS)
    expected = augmented_reference(x)
    for name in regularizers.BUILTINS:
        np.testing.assert_allclose(np_(values[name]), expected[name], rtol=1e-8)
    # By default the model's own names, weight 0 or not; one name may come as a string.
    assert set(model.penalties(f64(x))) == {"kinetic", "jacobian"}
    np.testing.assert_allclose(np_(model.penalties(f64(x), names="directional")["directional"]),
                               expected["directional"], rtol=1e-8)
    two = kr.RNODE([CNF(Affine(), trace="exact", rtol=1e-10, atol=1e-10, T=T / 2,
                        dtype="float64") for _ in range(2)], dtype="float64")
    # Two blocks of T/2 of a time-dependent field: not one block of T, but each
    # block's own integral from t = 0; the model adds them up.
    one = CNF(Affine(), trace="exact", rtol=1e-10, atol=1e-10, T=T / 2, dtype="float64")
    first = one(f64(x), training=True, penalties=("kinetic",))
    second = one(first.z, training=True, penalties=("kinetic",))
    np.testing.assert_allclose(
        np_(two.penalties(f64(x))["kinetic"]),
        np_(first.penalties["kinetic"]) + np_(second.penalties["kinetic"]), rtol=1e-10)


# Recorded with the code before named regularizers (commit 726ac67, TensorFlow 2.21,
# Keras 3.15): `RNODE([cnf], kinetic=0.01, jacobian=0.01)` in the run below.
BEFORE = {
    "exact": {"loss": [5.980973244, 6.013319969, 6.000217915],
              "kinetic": [0.000263763, 0.001055686, 0.002687599]},
    "hutchinson": {"loss": [5.980006218, 6.011684418, 5.99889183],
                   "kinetic": [0.000222145, 0.000957171, 0.002565249]},
}


@pytest.mark.skipif(BACKEND != "tensorflow", reason="recorded on TensorFlow")
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_new_penalties_at_zero_leave_a_seeded_run_as_it_was(trace):
    keras.utils.set_random_seed(3)
    x = kr.datasets.toy("8gaussians", 256, seed=0)
    net = kr.layers.ConcatSquashMLP(hidden=(8, 8))
    cnf = CNF(net, trace=trace, method="rk4", step_size=0.25, seed=1)
    model = kr.RNODE([cnf], regularizers={"kinetic": 0.01, "jacobian": 0.01,
                                          "directional": 0.0, "total_derivative": 0.0})
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=False)
    history = model.fit(kr.datasets.make_dataset(x, 64, seed=0, repeat=True), epochs=3,
                        steps_per_epoch=2, verbose=0, shuffle=False).history
    assert "directional" not in history and "total_derivative" not in history
    for key, values in BEFORE[trace].items():
        np.testing.assert_allclose(history[key], values, rtol=1e-5, err_msg=key)
