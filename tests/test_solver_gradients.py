"""Gradients of the solver: adjoint, direct, analytic and finite differences.

- Analytic gradients (decay with a rate variable, a harmonic oscillator as
  a tuple state with the loss on one component only).
- A small float64 keras dynamics: adjoint and direct at rtol = atol = 1e-10
  against central finite differences of a tight (1e-12) solve, for y0 and
  every weight, in eager mode, under tf.function and under
  tf.function(jit_compile=True) with the tape inside.
- Fixed-step RK4 and Euler: the direct gradient equals TensorFlow's
  autodiff through an explicitly unrolled scheme (the exact discrete
  gradient).
"""

import numpy as np
import pytest
import keras
import tensorflow as tf
from keras import ops

import keras_rnode as kr

GRADIENTS = ("adjoint", "direct")


def f64(x):
    return tf.constant(np.asarray(x, dtype="float64"))


# --------------------------------------------------------------------------
# Analytic gradients.


@pytest.mark.parametrize("gradient", GRADIENTS)
@pytest.mark.parametrize("t0, t1", [(0.0, 1.0), (0.5, -0.5)])
def test_decay_gradients_match_analytic(gradient, t0, t1):
    # y' = -k y: y(t1) = y0 exp(-k (t1 - t0)).
    k = tf.Variable(0.7, dtype="float64")
    y0 = f64([1.0, -2.0, 0.5])
    w = f64([0.3, 1.0, -2.0])
    with tf.GradientTape() as tape:
        tape.watch(y0)
        sol = kr.odeint(lambda t, y: -k * y, y0, t0, t1, rtol=1e-10, atol=1e-10,
                        gradient=gradient)
        loss = tf.reduce_sum(w * sol.y)
    g_y0, g_k = tape.gradient(loss, [y0, k])
    decay = np.exp(-0.7 * (t1 - t0))
    np.testing.assert_allclose(g_y0.numpy(), w.numpy() * decay, rtol=1e-8)
    expected_k = -(t1 - t0) * np.sum(w.numpy() * y0.numpy() * decay)
    np.testing.assert_allclose(g_k.numpy(), expected_k, rtol=1e-8)


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_tuple_state_gradient_with_unused_component(gradient):
    # x' = v, v' = -omega^2 x; the loss reads x(T) only, so v(T) gets no
    # cotangent (None) and must count as zero. Under tf.function (eager is
    # covered above and below, and is slow here).
    omega = tf.Variable(1.3, dtype="float64")
    x0, v0 = f64([1.0, -0.4]), f64([0.5, 2.0])
    big_t = 1.0

    def func(t, state):
        x, v = state
        return (v, -omega * omega * x)

    @tf.function
    def grads(x0, v0):
        with tf.GradientTape() as tape:
            tape.watch([x0, v0])
            sol = kr.odeint(func, (x0, v0), 0.0, big_t, rtol=1e-10, atol=1e-10,
                            gradient=gradient)
            loss = tf.reduce_sum(sol.y[0])
        return tape.gradient(loss, [x0, v0, omega])

    g_x0, g_v0, g_omega = grads(x0, v0)
    w = 1.3
    c, s = np.cos(w * big_t), np.sin(w * big_t)
    np.testing.assert_allclose(g_x0.numpy(), [c, c], rtol=1e-8)
    np.testing.assert_allclose(g_v0.numpy(), [s / w, s / w], rtol=1e-8)
    # x(T) = x0 cos(wT) + v0 sin(wT) / w
    dx_dw = -x0.numpy() * big_t * s - v0.numpy() * s / w**2 + v0.numpy() * big_t * c / w
    np.testing.assert_allclose(g_omega.numpy(), np.sum(dx_dw), rtol=1e-7)


@pytest.mark.parametrize("gradient", GRADIENTS)
@pytest.mark.parametrize("method, kwargs", [("dopri5", {}), ("rk4", dict(step_size=0.1))])
def test_zero_length_interval_gradient_is_identity(gradient, method, kwargs):
    y0 = f64([1.0, 2.0])
    with tf.GradientTape() as tape:
        tape.watch(y0)
        sol = kr.odeint(lambda t, y: -y * y, y0, 0.4, 0.4, method=method,
                        gradient=gradient, **kwargs)
        loss = tf.reduce_sum(f64([3.0, -1.0]) * sol.y)
    np.testing.assert_array_equal(tape.gradient(loss, y0).numpy(), [3.0, -1.0])


def test_gradient_none_stops_gradients():
    y0 = f64([1.0])
    with tf.GradientTape() as tape:
        tape.watch(y0)
        sol = kr.odeint(lambda t, y: -y, y0, gradient="none")
    assert tape.gradient(sol.y, y0) is None


def test_on_backward_receives_the_backward_stats():
    seen = []
    y0 = f64([1.0, 0.5])
    with tf.GradientTape() as tape:
        tape.watch(y0)
        sol = kr.odeint(lambda t, y: -y, y0, rtol=1e-6, atol=1e-6,
                        on_backward=seen.append)
    tape.gradient(sol.y, y0)
    assert len(seen) == 1
    stats = {k: int(v) for k, v in seen[0].items()}
    assert set(stats) == {"nfe", "accepted", "rejected", "status"}
    assert stats["status"] == kr.Status.SUCCESS
    assert stats["nfe"] == 6 * (stats["accepted"] + stats["rejected"]) + 2
    assert stats["accepted"] >= 1


# --------------------------------------------------------------------------
# A keras dynamics: adjoint and direct against finite differences.

T1 = 1.0
TOL = 1e-10


@pytest.fixture(scope="module")
def problem():
    keras.utils.set_random_seed(0)
    net = keras.Sequential([
        keras.Input((3,), dtype="float64"),
        keras.layers.Dense(6, activation="tanh", dtype="float64"),
        keras.layers.Dense(3, dtype="float64"),
    ])

    def func(t, y):
        return ops.cos(t) * net(y)  # time enters too

    rng = np.random.default_rng(0)
    y0 = f64(rng.normal(size=(2, 3)))
    w = f64(rng.normal(size=(2, 3)))

    @tf.function
    def loss_tight(y):
        sol = kr.odeint(func, y, 0.0, T1, rtol=1e-12, atol=1e-12, gradient="none")
        return tf.reduce_sum(w * sol.y)

    def central(perturb, size, eps=1e-5):
        out = np.zeros(size)
        for i in range(size):
            perturb(i, eps)
            plus = float(loss_tight(y0_var))
            perturb(i, -2 * eps)
            minus = float(loss_tight(y0_var))
            perturb(i, eps)
            out[i] = (plus - minus) / (2 * eps)
        return out

    y0_var = tf.Variable(y0)

    def bump_y0(i, e):
        y0_var.assign_add(tf.reshape(tf.one_hot(i, 6, dtype="float64") * e, (2, 3)))

    fd_y0 = central(bump_y0, 6).reshape(2, 3)
    fd_weights = []
    for v in net.trainable_variables:
        size = int(np.prod(v.shape))

        def bump(i, e, v=v, size=size):
            v.assign_add(tf.reshape(tf.one_hot(i, size, dtype="float64") * e, v.shape))

        fd_weights.append(central(bump, size).reshape(v.shape))
    return dict(net=net, func=func, y0=y0, w=w, fd=[fd_y0, *fd_weights])


def _gradients(problem, gradient):
    func, y0, w, net = problem["func"], problem["y0"], problem["w"], problem["net"]
    with tf.GradientTape() as tape:
        tape.watch(y0)
        sol = kr.odeint(func, y0, 0.0, T1, rtol=TOL, atol=TOL, gradient=gradient)
        loss = tf.reduce_sum(w * sol.y)
    return tape.gradient(loss, [y0, *net.trainable_variables])


@pytest.mark.parametrize("mode", ["eager", "graph", "jit"])
def test_keras_dynamics_gradients_match_finite_differences(problem, mode):
    def both():
        return [_gradients(problem, g) for g in GRADIENTS]

    if mode != "eager":
        both = tf.function(both, jit_compile=mode == "jit")
    results = both()
    fd = problem["fd"]
    for gradient, grads in zip(GRADIENTS, results):
        assert len(grads) == len(fd) == 5
        for g, ref in zip(grads, fd):
            assert g is not None
            np.testing.assert_allclose(g.numpy(), ref, rtol=1e-7, atol=1e-8,
                                       err_msg=f"{gradient} ({mode})")
    # Adjoint and direct agree with each other more tightly than with FD.
    for a, d in zip(*results):
        np.testing.assert_allclose(a.numpy(), d.numpy(), rtol=1e-8, atol=1e-9)


# --------------------------------------------------------------------------
# Fixed step: the direct gradient is the exact gradient of the discrete scheme.


def _unrolled(func, y, t0, h, steps, method):
    t = tf.constant(t0, "float64")
    for _ in range(steps):
        if method == "euler":
            y = y + h * func(t, y)
        else:
            k1 = func(t, y)
            k2 = func(t + h / 2, y + h / 2 * k1)
            k3 = func(t + h / 2, y + h / 2 * k2)
            k4 = func(t + h, y + h * k3)
            y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        t = t + h
    return y


@pytest.mark.parametrize("method", ["rk4", "euler"])
def test_fixed_step_direct_gradient_is_exact(method):
    keras.utils.set_random_seed(1)
    net = keras.Sequential([
        keras.Input((2,), dtype="float64"),
        keras.layers.Dense(5, activation="tanh", dtype="float64"),
        keras.layers.Dense(2, dtype="float64"),
    ])

    def func(t, y):
        return (1.0 + ops.sin(t)) * net(y)

    y0 = f64([[0.3, -1.0], [1.2, 0.4]])
    w = f64([[1.0, -0.5], [0.2, 2.0]])
    # A coarse step, so that the discrete gradient is far from the exact one.
    h, steps = 0.25, 6

    def grads(run):
        with tf.GradientTape() as tape:
            tape.watch(y0)
            loss = tf.reduce_sum(w * run())
        return [loss, *tape.gradient(loss, [y0, *net.trainable_variables])]

    ours = grads(lambda: kr.odeint(func, y0, 0.0, h * steps, method=method, step_size=h,
                                   gradient="direct").y)
    reference = grads(lambda: _unrolled(func, y0, 0.0, h, steps, method))
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)
