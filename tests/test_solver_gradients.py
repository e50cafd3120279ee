"""Gradients of the solver: adjoint, direct, analytic and finite differences.

Runs under every Keras backend.

- Analytic gradients (decay with a rate variable, a harmonic oscillator as
  a tuple state with the loss on one component only).
- A small float64 MLP on Keras variables: adjoint and direct at rtol = atol = 1e-10
  against central finite differences of a tight (1e-12) solve, for y0 and
  every weight, eagerly and compiled (tf.function with and without XLA,
  jax.jit) with the gradient taken inside.
- Fixed-step RK4 and Euler: the direct gradient equals the backend's
  autodiff through an explicitly unrolled scheme (the exact discrete
  gradient).
"""

import numpy as np
import pytest
import keras
from keras import ops

import keras_rnode as kr
from tests.backend_utils import BACKEND, MODES, compiled, f64, gradients, np_

pytestmark = pytest.mark.backends

GRADIENTS = ("adjoint", "direct")


def f64_variable(value):
    return keras.Variable(np.asarray(value, "float64"), dtype="float64")


class Float64MLP:
    """softplus(y W0 + b0) W1 + b1 in float64, with Keras variables.

    Through kr.backend.matmul, not ops.matmul or Dense: Keras 3.15's
    PyTorch matmul computes float64 in float32 (1e-7 errors), which no
    1e-10 solve survives. (Softplus: Keras's JAX tanh returns float32.)
    """

    def __init__(self, dim, hidden, seed):
        rng = np.random.default_rng(seed)
        self.trainable_variables = [
            f64_variable(rng.normal(size=(dim, hidden)) / np.sqrt(dim)),
            f64_variable(0.1 * rng.normal(size=(hidden,))),
            f64_variable(rng.normal(size=(hidden, dim)) / np.sqrt(hidden)),
            f64_variable(0.1 * rng.normal(size=(dim,))),
        ]

    def __call__(self, y):
        w0, b0, w1, b1 = self.trainable_variables
        h = ops.softplus(kr.backend.matmul(y, w0) + b0)
        return kr.backend.matmul(h, w1) + b1


# --------------------------------------------------------------------------
# Analytic gradients.


@pytest.mark.parametrize("gradient", GRADIENTS)
@pytest.mark.parametrize("t0, t1", [(0.0, 1.0), (0.5, -0.5)])
def test_decay_gradients_match_analytic(gradient, t0, t1):
    # y' = -k y: y(t1) = y0 exp(-k (t1 - t0)).
    k = f64_variable(0.7)
    y0 = np.array([1.0, -2.0, 0.5])
    w = f64([0.3, 1.0, -2.0])

    def loss(y0):
        sol = kr.odeint(lambda t, y: -k * y, y0, t0, t1, rtol=1e-10, atol=1e-10,
                        gradient=gradient)
        return ops.sum(w * sol.y)

    _, (g_y0,), (g_k,) = gradients(loss, [f64(y0)], [k])
    decay = np.exp(-0.7 * (t1 - t0))
    np.testing.assert_allclose(np_(g_y0), np_(w) * decay, rtol=1e-8)
    expected_k = -(t1 - t0) * np.sum(np_(w) * y0 * decay)
    np.testing.assert_allclose(np_(g_k), expected_k, rtol=1e-8)


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_tuple_state_gradient_with_unused_component(gradient):
    # x' = v, v' = -omega^2 x; the loss reads x(T) only, so v(T) gets no
    # cotangent (None) and must count as zero. Compiled where the backend
    # compiles (eager is covered above and below, and is slow here).
    omega = f64_variable(1.3)
    x0, v0 = np.array([1.0, -0.4]), np.array([0.5, 2.0])
    big_t = 1.0

    def func(t, state):
        x, v = state
        return (v, -omega * omega * x)

    def loss(x0, v0):
        sol = kr.odeint(func, (x0, v0), 0.0, big_t, rtol=1e-10, atol=1e-10,
                        gradient=gradient)
        return ops.sum(sol.y[0])

    run = compiled(lambda x0, v0: gradients(loss, [x0, v0], [omega]), MODES[-1])
    _, (g_x0, g_v0), (g_omega,) = run(f64(x0), f64(v0))
    w = 1.3
    c, s = np.cos(w * big_t), np.sin(w * big_t)
    np.testing.assert_allclose(np_(g_x0), [c, c], rtol=1e-8)
    np.testing.assert_allclose(np_(g_v0), [s / w, s / w], rtol=1e-8)
    # x(T) = x0 cos(wT) + v0 sin(wT) / w
    dx_dw = -x0 * big_t * s - v0 * s / w**2 + v0 * big_t * c / w
    np.testing.assert_allclose(np_(g_omega), np.sum(dx_dw), rtol=1e-7)


@pytest.mark.parametrize("gradient", GRADIENTS)
@pytest.mark.parametrize("method, kwargs", [("dopri5", {}), ("rk4", dict(step_size=0.1))])
def test_zero_length_interval_gradient_is_identity(gradient, method, kwargs):
    def loss(y0):
        sol = kr.odeint(lambda t, y: -y * y, y0, 0.4, 0.4, method=method,
                        gradient=gradient, **kwargs)
        return ops.sum(f64([3.0, -1.0]) * sol.y)

    _, (g,), _ = gradients(loss, [f64([1.0, 2.0])])
    np.testing.assert_array_equal(np_(g), [3.0, -1.0])


def test_gradient_none_stops_gradients():
    k = f64_variable(0.5)

    def loss(y0):
        return ops.sum(kr.odeint(lambda t, y: -k * y, y0, gradient="none").y)

    _, (g_y0,), (g_k,) = gradients(loss, [f64([1.0])], [k])
    assert np_(g_y0) == 0.0 and np_(g_k) == 0.0


@pytest.mark.skipif(BACKEND == "jax", reason="a custom JAX gradient cannot report")
def test_on_backward_receives_the_backward_stats():
    seen = []

    def loss(y0):
        sol = kr.odeint(lambda t, y: -y, y0, rtol=1e-6, atol=1e-6, on_backward=seen.append)
        return ops.sum(sol.y)

    gradients(loss, [f64([1.0, 0.5])])
    assert len(seen) == 1
    stats = {k: int(np_(v)) for k, v in seen[0].items()}
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
    net = Float64MLP(3, 6, seed=0)
    def func(t, y):
        # Time enters too. Not ops.cos(t): Keras's JAX cos returns float32.
        return (1.0 - 0.5 * t * t) * net(y)

    rng = np.random.default_rng(0)
    y0 = rng.normal(size=(2, 3))
    w = f64(rng.normal(size=(2, 3)))

    def tight(y, weights):
        mapping = list(zip(net.trainable_variables, weights))
        with keras.StatelessScope(state_mapping=mapping):
            sol = kr.odeint(func, y, 0.0, T1, rtol=1e-12, atol=1e-12, gradient="none")
        return ops.sum(w * sol.y)

    tight = compiled(tight, MODES[-1])
    weights = [np_(v) for v in net.trainable_variables]

    def loss_tight(y, i=None, value=None):
        """The tight loss at y, with weight i replaced by value."""
        ws = [value if j == i else v for j, v in enumerate(weights)]
        return float(np_(tight(f64(y), [f64(v) for v in ws])))

    def central(evaluate, value, eps=1e-5):
        """Central differences of evaluate(value) over every entry of value."""
        out = np.zeros(value.size)
        for i in range(value.size):
            bump = np.zeros(value.size)
            bump[i] = eps
            bump = bump.reshape(value.shape)
            out[i] = (evaluate(value + bump) - evaluate(value - bump)) / (2 * eps)
        return out.reshape(value.shape)

    fd = [central(loss_tight, y0)]
    for i, v in enumerate(weights):
        fd.append(central(lambda value, i=i: loss_tight(y0, i, value), v))
    return dict(net=net, func=func, y0=f64(y0), w=w, fd=fd)


def _gradients(problem, gradient, y0):
    func, w, net = problem["func"], problem["w"], problem["net"]

    def loss(y0):
        sol = kr.odeint(func, y0, 0.0, T1, rtol=TOL, atol=TOL, gradient=gradient)
        return ops.sum(w * sol.y)

    _, g_y0, g_v = gradients(loss, [y0], net.trainable_variables)
    return [*g_y0, *g_v]


@pytest.mark.parametrize("mode", MODES)
def test_keras_dynamics_gradients_match_finite_differences(problem, mode):
    both = compiled(lambda y0: [_gradients(problem, g, y0) for g in GRADIENTS], mode)
    results = both(problem["y0"])
    fd = problem["fd"]
    for gradient, grads in zip(GRADIENTS, results):
        assert len(grads) == len(fd) == 5
        for g, ref in zip(grads, fd):
            np.testing.assert_allclose(np_(g), ref, rtol=1e-7, atol=1e-8,
                                       err_msg=f"{gradient} ({mode})")
    # Adjoint and direct agree with each other more tightly than with FD.
    for a, d in zip(*results):
        np.testing.assert_allclose(np_(a), np_(d), rtol=1e-8, atol=1e-9)


# --------------------------------------------------------------------------
# Fixed step: the direct gradient is the exact gradient of the discrete scheme.


def _unrolled(func, y, t0, h, steps, method):
    t = f64(t0)
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
    net = Float64MLP(2, 5, seed=1)
    def func(t, y):
        return (1.0 + t - t * t) * net(y)

    y0 = f64([[0.3, -1.0], [1.2, 0.4]])
    w = f64([[1.0, -0.5], [0.2, 2.0]])
    # A coarse step, so that the discrete gradient is far from the exact one.
    h, steps = 0.25, 6

    def grads(run):
        loss, g_y0, g_v = gradients(lambda y: ops.sum(w * run(y)), [y0],
                                    net.trainable_variables)
        return [loss, *g_y0, *g_v]

    ours = grads(lambda y: kr.odeint(func, y, 0.0, h * steps, method=method, step_size=h,
                                     gradient="direct").y)
    reference = grads(lambda y: _unrolled(func, y, 0.0, h, steps, method))
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(np_(a), np_(b), rtol=1e-12, atol=1e-14)


def test_adjoint_ends_on_nan_instead_of_looping():
    # A NaN cotangent makes the adjoint's derivatives, and so its first step,
    # NaN. The backward solve must end at once (step underflow), not
    # reject its way to max_steps.
    seen = []

    def loss(y0):
        sol = kr.odeint(lambda t, y: -y, y0, rtol=1e-6, atol=1e-6, max_steps=100_000,
                        on_backward=seen.append)
        return ops.sum(f64([np.nan, 1.0]) * sol.y)

    _, (g,), _ = gradients(loss, [f64([1.0, 2.0])])
    assert np.isnan(np_(g)).all()  # a failed backward solve gives no gradient
    if BACKEND != "jax":  # a custom JAX gradient cannot report
        stats = {k: int(np_(v)) for k, v in seen[0].items()}
        assert stats["status"] == kr.Status.STEP_UNDERFLOW
        assert stats["accepted"] + stats["rejected"] < 100


def test_adjoint_backward_solve_inherits_every_forward_setting(monkeypatch):
    # The backward solve gets the forward settings whole, so an option added
    # later cannot be dropped on the way; only the first step is its own.
    from keras_rnode.solvers import adjoint

    seen = []
    integrate = adjoint.integrate
    monkeypatch.setattr(adjoint, "integrate", lambda func, settings, *args, **kwargs: (
        seen.append(settings) or integrate(func, settings, *args, **kwargs)))
    settings = kr.SolverSettings(rtol=1e-7, atol=1e-8, max_steps=500, first_step=0.01,
                                 controller=kr.StepController(safety=0.8, max_factor=4.0))
    _, (g,), _ = gradients(lambda y: ops.sum(kr.odeint(lambda t, y: -y, y, solver=settings).y),
                           [f64([1.0, 2.0])])
    np.testing.assert_allclose(np_(g), np.exp(-1.0), rtol=1e-6)
    assert seen == [settings.replace(first_step=None)]


# --------------------------------------------------------------------------
# Everything a solve reads gets its true gradient: args, captured tensors, end times.


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gradient", GRADIENTS)
@pytest.mark.parametrize("passed", ["args", "captured"])
def test_a_tensor_computed_outside_the_solve_gets_its_gradient(passed, gradient, mode):
    # A conditional flow's situation: an encoder variable v gives a context
    # c = 2 v outside the solve; the dynamics dy/dt = -w y + c read c and
    # their own weight w. L = sum y(1), so dL/dv_i = 2 (1 - e^-w) / w. On
    # TensorFlow a captured c used to get None, so the encoder never trained.
    w, v = f64_variable(1.3), f64_variable([0.5, -1.0])
    y0 = f64([1.0, 2.0])

    def loss():
        c = 2.0 * v
        options = dict(rtol=1e-10, atol=1e-10, gradient=gradient)
        if passed == "args":
            sol = kr.odeint(lambda t, y, c_: -w * y + c_, y0, 0.0, 1.0, args=c, **options)
        else:
            sol = kr.odeint(lambda t, y: -w * y + c, y0, 0.0, 1.0, **options)
        return ops.sum(sol.y)

    _, _, (g_w, g_v) = compiled(lambda: gradients(loss, [], [w, v]), mode)()
    e = np.exp(-1.3)
    np.testing.assert_allclose(np_(g_v), [1.119182] * 2, rtol=1e-6)
    np.testing.assert_allclose(np_(g_v), 2 * (1 - e) / 1.3, rtol=1e-8)
    c = 2.0 * np.array([0.5, -1.0])
    dw = -np.array([1.0, 2.0]) * e + c * (1.3 * e - (1 - e)) / 1.3**2
    np.testing.assert_allclose(np_(g_w), dw.sum(), rtol=1e-8)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gradient", GRADIENTS)
@pytest.mark.parametrize("as_variables", [False, True])
def test_end_time_gradients(as_variables, gradient, mode):
    # dy/dt = -y from t0 = 0.2 to t1 = 0.9, L = y(t1): dL/dt1 = f(t1, y(t1))
    # = -e^-0.7 = -0.496585 and dL/dt0 = -dL/dy0 f(t0, y0) = +0.496585. Used
    # to be None in compiled code or beside a gradient for y0, 0 for
    # variables (taken for weights), and a tracer error on JAX.
    def loss(y0, t0, t1):
        sol = kr.odeint(lambda t, y: -y, y0, t0, t1, rtol=1e-10, atol=1e-10,
                        gradient=gradient)
        return ops.sum(sol.y)

    y0 = f64([1.0])
    if as_variables:
        t0, t1 = f64_variable(0.2), f64_variable(0.9)
        run = compiled(lambda y: gradients(lambda y_: loss(y_, t0, t1), [y], [t0, t1]), mode)
        _, (g_y0,), (g_t0, g_t1) = run(y0)
    else:
        run = compiled(lambda *a: gradients(loss, list(a)), mode)
        _, (g_y0, g_t0, g_t1), _ = run(y0, f64(0.2), f64(0.9))
    np.testing.assert_allclose(np_(g_t1), -0.496585, rtol=1e-6)
    np.testing.assert_allclose(np_(g_t0), 0.496585, rtol=1e-6)
    np.testing.assert_allclose(np_(g_t1), -np.exp(-0.7), rtol=1e-8)
    np.testing.assert_allclose(np_(g_y0), [np.exp(-0.7)], rtol=1e-8)


@pytest.mark.parametrize("gradient", GRADIENTS)
@pytest.mark.parametrize("method, kwargs", [("dopri5", dict(rtol=1e-11, atol=1e-11)),
                                            ("rk4", dict(step_size=0.01))])
def test_args_and_end_time_gradients_match_finite_differences(method, kwargs, gradient):
    # Nonlinear and time-dependent, with args as a structure: dy/dt =
    # a y (1 - y) (1 + t^2) + b. Central differences of the float64 loss.
    w = f64([0.7, -1.2])

    def loss(y0, a, b, t0, t1):
        def func(t, y, ab):
            return ab[0] * y * (1.0 - y) * (1.0 + t * t) + ab[1]

        sol = kr.odeint(func, y0, t0, t1, args=(a, b), method=method, gradient=gradient,
                        **kwargs)
        return ops.sum(w * sol.y)

    point = [np.array([0.2, 0.6]), np.array(0.8), np.array([0.1, -0.05]), np.array(0.1),
             np.array(1.3)]
    _, grads, _ = gradients(loss, [f64(p) for p in point])

    def value(values):
        return float(np_(loss(*[f64(p) for p in values])))

    h = 1e-5
    for i, p in enumerate(point):
        fd = np.zeros(p.shape)
        for j in np.ndindex(p.shape):
            up, down = [q.copy() for q in point], [q.copy() for q in point]
            up[i][j] += h
            down[i][j] -= h
            fd[j] = (value(up) - value(down)) / (2 * h)
        # rk4: the discrete solve's gradient, exact for y0 and args; the end
        # times' continuous-time formula is within the scheme's O(h^4).
        np.testing.assert_allclose(np_(grads[i]), fd, rtol=1e-6, atol=1e-8,
                                   err_msg=f"input {i}")
