"""The ODE solver against independent references.

Analytic solutions (decay, expm of a linear system, a harmonic oscillator
held as a tuple state, the logistic equation), scipy's RK45 (error and
function evaluations at the same tolerances) and a tight DOP853 reference,
orders of convergence of the fixed-step methods, reverse time, the step
bound, NaN recovery and underflow, error control, float32, bad input and
the counting of function evaluations. Gradients: test_solver_gradients.py.

Everything is small: the suite shares two cores.
"""

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import keras
from keras import ops

import keras_rnode as kr
from keras_rnode.solvers.solution import Status
from tests.backend_utils import BACKEND, MODES, compiled, f64, np_

pytestmark = pytest.mark.backends

# Python calls of func are evaluations when the loops run eagerly; JAX
# traces func a fixed number of times instead.
EAGER_CALLS = BACKEND != "jax"


def stats(sol):
    return {k: int(ops.convert_to_numpy(v)) for k, v in sol.stats.items()}


def f32(x):
    return ops.convert_to_tensor(np.asarray(x), dtype="float32")


def dtype_of(x):
    return keras.backend.standardize_dtype(x.dtype)


# --------------------------------------------------------------------------
# Analytic problems (float64): error close to the tolerance, shrinking with it.

TOLS = (1e-4, 1e-6, 1e-8)


def _max_rel_error(approx, exact):
    return float(np.max(np.abs(approx - exact) / np.maximum(np.abs(exact), 1.0)))


def _check_tolerance_proportionality(errors):
    """errors[i] belongs to TOLS[i]: each within 50x of its tolerance,
    and each a clear improvement on the one before (a 100x tighter
    tolerance buys at least 10x)."""
    for tol, err in zip(TOLS, errors):
        assert err <= 50 * tol, (tol, err, errors)
    for a, b in zip(errors, errors[1:]):
        assert b < a / 10, errors


def test_exponential_decay():
    k = np.array([0.5, 1.0, 2.0, 3.0])
    y0 = np.array([1.0, -2.0, 0.5, 3.0])
    exact = y0 * np.exp(-k * 2.0)
    rate = f64(k)
    errors = []
    for tol in TOLS:
        sol = kr.odeint(lambda t, y: -rate * y, f64(y0), 0.0, 2.0, rtol=tol, atol=tol,
                        gradient="none")
        assert dtype_of(sol.y) == "float64" and tuple(sol.y.shape) == (4,)
        assert sol.status == "success"
        errors.append(_max_rel_error(np_(sol.y), exact))
    _check_tolerance_proportionality(errors)


def test_linear_system_against_expm():
    rng = np.random.default_rng(0)
    # A rotation with decay and some coupling: eigenvalues -0.3 +- 2i, -1.
    a = np.array([[-0.3, 2.0, 0.1], [-2.0, -0.3, 0.4], [0.0, 0.2, -1.0]])
    y0 = rng.normal(size=(5, 3))  # a batch of 5 states of dimension 3
    t1 = 1.5
    exact = y0 @ scipy.linalg.expm(a * t1).T
    a_t = f64(a.T)
    errors = []
    for tol in TOLS:
        # The package's matmul: Keras's PyTorch ops.matmul computes float64 in float32.
        sol = kr.odeint(lambda t, y: kr.backend.matmul(y, a_t), f64(y0), 0.0, t1,
                        rtol=tol, atol=tol, gradient="none")
        assert tuple(sol.y.shape) == (5, 3)
        assert sol.status == "success"
        errors.append(_max_rel_error(np_(sol.y), exact))
    _check_tolerance_proportionality(errors)


def test_harmonic_oscillator_tuple_state():
    omega = 2.0
    x0 = np.array([1.0, 0.0, -0.5])
    v0 = np.array([0.0, 1.0, 0.3])
    t1 = 2.0
    x_exact = x0 * np.cos(omega * t1) + v0 / omega * np.sin(omega * t1)
    v_exact = -x0 * omega * np.sin(omega * t1) + v0 * np.cos(omega * t1)

    def func(t, state):
        x, v = state
        return (v, -omega**2 * x)

    errors = []
    for tol in TOLS:
        sol = kr.odeint(func, (f64(x0), f64(v0)), 0.0, t1, rtol=tol, atol=tol,
                        gradient="none")
        assert isinstance(sol.y, tuple) and len(sol.y) == 2
        x, v = sol.y
        assert tuple(x.shape) == (3,) and tuple(v.shape) == (3,)
        errors.append(max(_max_rel_error(np_(x), x_exact), _max_rel_error(np_(v), v_exact)))
    _check_tolerance_proportionality(errors)


def test_time_dependent_dynamics_both_directions():
    # y' = (1 - t) y: y(t1) = y(t0) exp(g(t1) - g(t0)), g = t - t^2 / 2; t must
    # reach func. (Not cos(t): Keras's JAX cos returns float32 for float64.)
    def func(t, y):
        return (1.0 - t) * y

    def g(t):
        return t - t * t / 2

    y0 = f64([1.0, 2.0])
    for t0, t1 in ((0.0, 2.5), (2.5, -0.5)):
        sol = kr.odeint(func, y0, t0, t1, rtol=1e-9, atol=1e-9, gradient="none")
        exact = np_(y0) * np.exp(g(t1) - g(t0))
        assert _max_rel_error(np_(sol.y), exact) < 5e-8


# --------------------------------------------------------------------------
# Against scipy's RK45 at the same tolerances.


def _lotka_volterra(t, y):
    x, z = y[..., 0:1], y[..., 1:2]
    return ops.concatenate([1.5 * x - x * z, -3.0 * z + x * z], axis=-1)


def _lotka_volterra_np(t, y):
    x, z = y
    return [1.5 * x - x * z, -3.0 * z + x * z]


def _van_der_pol(mu):
    def func(t, y):
        x, v = y[..., 0:1], y[..., 1:2]
        return ops.concatenate([v, mu * (1.0 - x * x) * v - x], axis=-1)

    def func_np(t, y):
        x, v = y
        return [v, mu * (1.0 - x * x) * v - x]

    return func, func_np


PROBLEMS = {
    "lotka_volterra": (_lotka_volterra, _lotka_volterra_np, [1.0, 1.0], 8.0),
    "van_der_pol_0.5": (*_van_der_pol(0.5), [2.0, 0.0], 8.0),
    "van_der_pol_1": (*_van_der_pol(1.0), [2.0, 0.0], 8.0),
}


@pytest.mark.parametrize("tol", [1e-4, 1e-6])
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_against_scipy_rk45(name, tol):
    func, func_np, y0, t1 = PROBLEMS[name]
    reference = scipy.integrate.solve_ivp(
        func_np, (0.0, t1), y0, method="DOP853", rtol=1e-13, atol=1e-13).y[:, -1]
    theirs = scipy.integrate.solve_ivp(func_np, (0.0, t1), y0, method="RK45",
                                       rtol=tol, atol=tol)
    assert theirs.success
    sol = kr.odeint(func, f64([y0]), 0.0, t1, rtol=tol, atol=tol, gradient="none")
    ours = stats(sol)
    assert sol.status == "success"
    our_error = np.max(np.abs(np_(sol.y)[0] - reference))
    their_error = np.max(np.abs(theirs.y[:, -1] - reference))
    # Comparable accuracy (the same method and controller: within 2x) ...
    assert our_error <= 2.0 * their_error + 1e-14, (our_error, their_error)
    assert their_error <= 2.0 * our_error + 1e-14, (our_error, their_error)
    # ... for a comparable number of evaluations of the dynamics.
    assert abs(ours["nfe"] - theirs.nfev) <= 0.25 * theirs.nfev, (ours, theirs.nfev)
    # Tighter: it is the same controller (Hairer's first step, safety 0.9,
    # factors 0.2..10, no growth right after a rejection), so the step
    # sequences agree; allow one attempt (6 evaluations) for rounding.
    assert abs(ours["nfe"] - theirs.nfev) <= 6, (ours, theirs.nfev)
    assert ours["nfe"] == 6 * (ours["accepted"] + ours["rejected"]) + 2


@pytest.mark.parametrize("controller", [
    kr.StepController(safety=0.8),
    kr.StepController(min_factor=0.5, max_factor=3.0),
])
def test_controller_settings_reach_the_solve(controller, monkeypatch):
    # scipy's RK45 reads its controller constants at each step: set them to
    # ours and the step sequences agree again, where the defaults do not.
    import scipy.integrate._ivp.rk as scipy_rk

    func, func_np, y0, t1 = PROBLEMS["van_der_pol_1"]
    default = stats(kr.odeint(func, f64([y0]), 0.0, t1, rtol=1e-6, atol=1e-6,
                              gradient="none"))
    sol = kr.odeint(func, f64([y0]), 0.0, t1, rtol=1e-6, atol=1e-6, gradient="none",
                    controller=controller)
    ours = stats(sol)
    for name, value in (("SAFETY", controller.safety), ("MIN_FACTOR", controller.min_factor),
                        ("MAX_FACTOR", controller.max_factor)):
        monkeypatch.setattr(scipy_rk, name, value)
    theirs = scipy.integrate.solve_ivp(func_np, (0.0, t1), y0, method="RK45", rtol=1e-6,
                                       atol=1e-6)
    assert sol.status == "success" and theirs.success
    assert abs(ours["nfe"] - theirs.nfev) <= 6, (ours, theirs.nfev)
    assert abs(ours["nfe"] - default["nfe"]) > 6, (ours, default)


@pytest.mark.parametrize("kwargs, match", [
    (dict(safety=1.5), "safety <= 1"),
    (dict(safety=0.0), "safety must be a positive finite number"),
    (dict(min_factor=2.0), "min_factor"),
    (dict(max_factor=0.5), "max_factor"),
    (dict(max_factor=True), "max_factor must be a positive finite number"),
])
def test_bad_controller_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kr.StepController(**kwargs)


def test_settings_are_one_value():
    settings = kr.SolverSettings(method="rk4", step_size=0.25, max_steps=7)
    # A value: equal by fields, rebuilt from its config, checked again on change.
    assert kr.SolverSettings.from_config(settings.to_config()) == settings
    assert settings.for_evaluation(method="euler").step_size == 0.25
    assert settings.for_evaluation(method="dopri5").step_size is None
    with pytest.raises(ValueError, match="max_steps must be an integer >= 1"):
        settings.replace(max_steps=0)
    # odeint takes it whole, or its fields as keywords, or both (keywords win).
    y0 = f64([1.0])
    whole = stats(kr.odeint(_decay, y0, solver=settings, gradient="none"))
    fields = stats(kr.odeint(_decay, y0, method="rk4", step_size=0.25, max_steps=7,
                             gradient="none"))
    assert whole == fields and whole["accepted"] == 4
    assert stats(kr.odeint(_decay, y0, solver=settings, step_size=0.5))["accepted"] == 2
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['rtoll'\]"):
        kr.odeint(_decay, y0, rtoll=1e-3)


# --------------------------------------------------------------------------
# Fixed-step methods: order of convergence on a nonlinear problem.


def _logistic_exact(y0, t):
    return 1.0 / (1.0 + (1.0 / y0 - 1.0) * np.exp(-t))


@pytest.mark.parametrize("method, order, steps", [
    ("rk4", 4, (0.4, 0.2, 0.1, 0.05)),
    ("euler", 1, (0.1, 0.05, 0.025, 0.0125)),
])
def test_fixed_step_order_of_convergence(method, order, steps):
    y0 = np.array([0.05, 0.2, 0.9])
    t1 = 4.0
    exact = _logistic_exact(y0, t1)
    errors = []
    for h in steps:
        sol = kr.odeint(lambda t, y: y * (1.0 - y), f64(y0), 0.0, t1, method=method,
                        step_size=h, gradient="none")
        s = stats(sol)
        n = int(round(t1 / h))
        assert s == {"nfe": n * {"rk4": 4, "euler": 1}[method], "accepted": n,
                     "rejected": 0, "status": Status.SUCCESS}
        errors.append(np.max(np.abs(np_(sol.y) - exact)))
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.15 * order, (slope, errors)


def test_fixed_step_lands_on_t1():
    # 1 / 0.3 is not whole: 4 uniform steps of 0.25; 1 / 0.1 stays 10 steps.
    for step, n in ((0.3, 4), (0.1, 10)):
        sol = kr.odeint(lambda t, y: ops.ones_like(y), f64([0.0]), 0.0, 1.0,
                        method="euler", step_size=step, gradient="none")
        assert stats(sol)["accepted"] == n
        np.testing.assert_allclose(np_(sol.y), [1.0], rtol=0, atol=1e-14)


# --------------------------------------------------------------------------
# Reverse time, empty intervals, the step bound.


@pytest.mark.parametrize("method, kwargs", [
    ("dopri5", dict(rtol=1e-9, atol=1e-9)),
    ("rk4", dict(step_size=0.02)),
])
def test_reverse_time_returns_to_y0(method, kwargs):
    y0 = f64([[1.0, 1.0], [0.5, 2.0]])
    forward = kr.odeint(_lotka_volterra, y0, 0.0, 1.0, method=method, gradient="none",
                        **kwargs)
    assert not np.allclose(np_(forward.y), np_(y0), atol=0.1)
    back = kr.odeint(_lotka_volterra, forward.y, 1.0, 0.0, method=method,
                     gradient="none", **kwargs)
    assert forward.status == back.status == "success"
    np.testing.assert_allclose(np_(back.y), np_(y0), rtol=1e-7, atol=1e-7)


def test_reverse_time_matches_exact():
    sol = kr.odeint(lambda t, y: -y, f64([2.0]), 1.0, -1.0, rtol=1e-9, atol=1e-9,
                    gradient="none")
    np.testing.assert_allclose(np_(sol.y), [2.0 * np.exp(2.0)], rtol=5e-8)


@pytest.mark.parametrize("method, kwargs", [("dopri5", {}), ("rk4", dict(step_size=0.1))])
def test_zero_length_interval(method, kwargs):
    calls = []

    def func(t, y):
        calls.append(1)
        return -y

    y0 = f64([1.0, -3.0])
    sol = kr.odeint(func, y0, 0.7, 0.7, method=method, **kwargs)
    np.testing.assert_array_equal(np_(sol.y), np_(y0))
    assert stats(sol) == {"nfe": 0, "accepted": 0, "rejected": 0, "status": Status.SUCCESS}
    if BACKEND == "tensorflow":
        # Eager: nothing is evaluated at all. (JAX traces func once to find
        # its weights, and PyTorch evaluates it once for the same reason.)
        assert calls == []
    assert sol.status == "success"


def test_max_steps_reached_eager_and_graph():
    def func(t, y):
        return ops.cos(5.0 * t) * y

    y0 = f64([1.0])
    sol = kr.odeint(func, y0, 0.0, 10.0, rtol=1e-8, atol=1e-8, max_steps=3)
    s = stats(sol)
    assert sol.status == "max_steps_reached"
    assert s["status"] == Status.MAX_STEPS_REACHED
    assert s["accepted"] + s["rejected"] == 3
    assert s["nfe"] == 6 * 3 + 2
    assert not sol.succeeded

    graph = compiled(lambda y: kr.odeint(func, y, 0.0, 10.0, rtol=1e-8, atol=1e-8,
                                            max_steps=3).stats, MODES[-1])
    g = {k: int(v) for k, v in graph(y0).items()}
    assert g == s

    fixed = kr.odeint(func, y0, 0.0, 10.0, method="rk4", step_size=0.1, max_steps=3)
    assert stats(fixed) == {"nfe": 12, "accepted": 3, "rejected": 0,
                            "status": Status.MAX_STEPS_REACHED}
    # The state where it stopped: t = 0.3.
    np.testing.assert_allclose(np_(fixed.y), [np.exp(np.sin(1.5) / 5.0)], rtol=1e-5)


# --------------------------------------------------------------------------
# NaN handling.


def _rk4_recurrence_float32(rate, h, steps):
    y, f = np.float32(1.0), lambda y_: np.float32(-rate) * y_
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(steps):
            k1 = f(y)
            k2 = f(y + np.float32(h / 2) * k1)
            k3 = f(y + np.float32(h / 2) * k2)
            k4 = f(y + np.float32(h) * k3)
            y = y + np.float32(h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
    return y


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method, rate", [("rk4", 4000.0), ("euler", 4e10)])
def test_fixed_step_solve_that_ends_in_nan_says_so(method, rate, mode):
    # rk4 at step 0.25 on dy/dt = -4000 y: the amplification factor is about
    # 2.8e10 per step, so float32 overflows to inf and then to NaN, as the
    # same recurrence does in NumPy. It used to report "success". (Euler's
    # factor is 1 - 0.25 rate: it needs a stiffer problem to overflow.)
    if method == "rk4":
        assert not np.isfinite(_rk4_recurrence_float32(rate, 0.25, 4))
    solve = compiled(lambda y: kr.odeint(lambda t, y_: -rate * y_, y, 0.0, 1.0,
                                         method=method, step_size=0.25,
                                         gradient="none").stats, mode)
    s = {k: int(np_(v)) for k, v in solve(f32([1.0])).items()}
    assert s["status"] == Status.NON_FINITE_STATE
    # It stops at the first non-finite state instead of stepping on in NaN.
    assert 1 <= s["accepted"] <= 4 and s["nfe"] == s["accepted"] * (4 if method == "rk4" else 1)
    sol = kr.odeint(lambda t, y_: -rate * y_, f32([1.0]), 0.0, 1.0, method=method,
                    step_size=0.25)
    assert sol.status == "non_finite_state" and not sol.succeeded
    assert not np.isfinite(np_(sol.y)).all()


def test_adaptive_solve_that_ends_in_nan_says_so():
    # A state left out of error control can go non-finite in accepted steps.
    sol = kr.odeint(lambda t, y: (-y[0], y[1] * y[1] * 1e3), (f64([1.0]), f64([1.0])),
                    0.0, 1.0, error_control=(True, False), gradient="none")
    assert sol.status == "non_finite_state"
    np.testing.assert_allclose(np_(sol.y[0]), [np.exp(-1.0)], rtol=1e-4)


@pytest.mark.skipif(BACKEND == "jax", reason="func reads its values; JAX traces it")
def test_nan_from_too_large_step_is_rejected_and_recovers():
    # y' = -sqrt(y), y(0) = 1: y = (1 - t/2)^2, y(1.5) = 0.0625. A first
    # step of 1.9 (clipped to the interval, 1.5) drives stages below zero,
    # where sqrt is NaN. (Up to t1 = 1 the stages of a whole-interval first
    # step all stay positive: no NaN there, hence 1.5.)
    saw_nan = []

    def func(t, y):
        out = -ops.sqrt(y)
        saw_nan.append(bool(np.any(np.isnan(np_(out)))))
        return out

    sol = kr.odeint(func, f64([1.0]), 0.0, 1.5, rtol=1e-8, atol=1e-8, first_step=1.9,
                    gradient="none")
    s = stats(sol)
    assert any(saw_nan)
    assert s["rejected"] >= 1
    assert sol.status == "success"
    np.testing.assert_allclose(np_(sol.y), [0.0625], rtol=1e-7)
    assert s["nfe"] == 6 * (s["accepted"] + s["rejected"]) + 1  # given first step
    assert s["nfe"] == len(saw_nan)


def test_nan_everywhere_beyond_a_time_ends_in_step_underflow():
    def func(t, y):
        return ops.where(t > 0.5, ops.full_like(y, np.nan), -y)

    sol = kr.odeint(func, f64([1.0]), 0.0, 1.0, rtol=1e-6, atol=1e-6,
                    max_steps=100_000, gradient="none")
    s = stats(sol)
    assert sol.status == "step_underflow"
    assert s["accepted"] + s["rejected"] < 1000  # stopped by underflow, not the bound
    # It stopped just short of t = 0.5 with the right state.
    np.testing.assert_allclose(np_(sol.y), [np.exp(-0.5)], rtol=1e-5)

    graph = compiled(lambda y: kr.odeint(func, y, 0.0, 1.0, rtol=1e-6, atol=1e-6,
                                            max_steps=100_000, gradient="none").stats,
                     MODES[-1])
    assert int(graph(f64([1.0]))["status"]) == Status.STEP_UNDERFLOW


# --------------------------------------------------------------------------
# Error control, float32, counting.


def test_uncontrolled_state_does_not_affect_steps():
    def alone(t, x):
        return -x * ops.cos(t)

    def together(t, state):
        x, z = state
        # A fast, large-amplitude companion that would force small steps.
        return (alone(t, x), 10.0 * ops.cos(10.0 * t) * ops.ones_like(z))

    x0 = f64([1.0, 2.0])
    z0 = f64([0.0])
    kwargs = dict(rtol=1e-6, atol=1e-6, gradient="none")
    ref = kr.odeint(alone, x0, 0.0, 2.0, **kwargs)
    sol = kr.odeint(together, (x0, z0), 0.0, 2.0, error_control=(True, False), **kwargs)
    assert stats(sol) == stats(ref)
    np.testing.assert_array_equal(np_(sol.y[0]), np_(ref.y))
    controlled = kr.odeint(together, (x0, z0), 0.0, 2.0, **kwargs)
    assert stats(controlled)["accepted"] > 3 * stats(ref)["accepted"]


def test_float32():
    a = np.array([[-0.3, 2.0], [-2.0, -0.3]])
    y0 = np.array([[1.0, 0.5], [-0.2, 1.0]])
    exact = y0 @ scipy.linalg.expm(a * 2.0).T
    a_t = f32(a.T)
    # 1e-6 is the tightest round tolerance float32 resolves (issue 26.2).
    for tol, bound in ((1e-4, 1e-3), (1e-6, 1e-5)):
        sol = kr.odeint(lambda t, y: ops.matmul(y, a_t), f32(y0),
                        0.0, 2.0, rtol=tol, atol=tol, gradient="none")
        assert dtype_of(sol.y) == "float32"
        assert sol.status == "success"
        assert _max_rel_error(np_(sol.y).astype("float64"), exact) < bound
    for method in ("rk4", "euler"):
        sol = kr.odeint(lambda t, y: ops.matmul(y, a_t), f32(y0),
                        0.0, 2.0, method=method, step_size=0.1, gradient="none")
        assert dtype_of(sol.y) == "float32"


@pytest.mark.parametrize("dtype, eps", [("float16", 2.0 ** -10), ("bfloat16", 2.0 ** -7),
                                        ("float32", 2.0 ** -23)])
def test_tolerances_below_the_dtypes_resolution_are_refused(dtype, eps):
    # Issue 26.2: below a few eps the error estimate is rounding noise, and
    # the solve cannot meet the tolerance; 8 eps is the line.
    y0 = ops.convert_to_tensor(np.ones((2,), "float32"), dtype=dtype)
    for field in ("rtol", "atol"):
        tols = {"rtol": 8 * eps, "atol": 8 * eps, field: 7.9 * eps}
        with pytest.raises(ValueError, match=rf"^{field}=\S+ is below what {dtype} resolves "
                                             r"\(8 eps = \S+\): give"):
            kr.odeint(_decay, y0, **tols)
    # At 8 eps it runs; so do the fixed-step methods, which have no tolerance.
    kr.odeint(_decay, y0, rtol=8 * eps, atol=8 * eps, max_steps=2)
    kr.odeint(_decay, y0, rtol=1e-9, atol=1e-9, method="rk4", step_size=0.5)


def test_default_tolerances_and_1e_6_stay_allowed_in_float32():
    for tol in (1e-5, 1e-6):
        assert kr.odeint(_decay, f32([1.0]), rtol=tol, atol=tol).status == "success"


def test_a_float64_y0_narrowed_by_the_backend_warns():
    import warnings

    if BACKEND == "jax":
        import jax

        with jax.enable_x64(False):
            with pytest.warns(UserWarning, match="odeint: y0 is float64 but the jax backend "
                                                 "made it float32.*JAX_ENABLE_X64=1"):
                sol = kr.odeint(_decay, np.ones((2,), "float64"), rtol=1e-4, atol=1e-4)
            assert dtype_of(sol.y) == "float32"
    # Where float64 is kept (here JAX with x64, as the tests run it), no word.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="odeint")
        sol = kr.odeint(_decay, np.ones((2,), "float64"), rtol=1e-4, atol=1e-4)
    assert dtype_of(sol.y) == "float64"


@pytest.mark.parametrize("first_step, extra", [(None, 2), (0.1, 1)])
def test_nfe_counts_calls_of_func(first_step, extra):
    calls = []

    def func(t, y):
        calls.append(1)
        return ops.stack([y[..., 1], -y[..., 0] - 0.1 * y[..., 1]], axis=-1)

    sol = kr.odeint(func, f64([[1.0, 0.0]]), 0.0, 5.0, rtol=1e-5, atol=1e-5,
                    first_step=first_step, gradient="none")
    s = stats(sol)
    if EAGER_CALLS:
        assert s["nfe"] == len(calls)
    assert s["nfe"] == 6 * (s["accepted"] + s["rejected"]) + extra
    assert s["accepted"] > 3


@pytest.mark.parametrize("method, per_step", [("rk4", 4), ("euler", 1)])
def test_fixed_step_nfe_counts_calls(method, per_step):
    calls = []

    def func(t, y):
        calls.append(1)
        return -y

    sol = kr.odeint(func, f64([1.0]), 0.0, 1.0, method=method, step_size=0.125,
                    gradient="none")
    assert stats(sol)["nfe"] == 8 * per_step
    if EAGER_CALLS:
        assert len(calls) == 8 * per_step


# --------------------------------------------------------------------------
# Bad input: ValueError naming the argument.


def _decay(t, y):
    return -y


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="rk45"), "method"),
    (dict(rtol=0.0), "rtol"),
    (dict(rtol=-1e-3), "rtol"),
    (dict(atol=0.0), "atol"),
    (dict(atol=-1.0), "atol"),
    (dict(max_steps=0), "max_steps"),
    (dict(max_steps=-5), "max_steps"),
    (dict(max_steps=2.5), "max_steps"),
    (dict(gradient="backprop"), "gradient"),
    (dict(method="rk4"), "step_size"),
    (dict(method="euler", step_size=0.0), "step_size"),
    (dict(method="dopri5", step_size=0.1), "step_size"),
    (dict(first_step=-0.1), "first_step"),
    (dict(error_control=(True, False)), "error_control"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kr.odeint(_decay, f64([1.0]), **kwargs)


@pytest.mark.parametrize("t0, t1, name", [
    (0.0, float("nan"), "t1"), (float("nan"), 1.0, "t0"), (0.0, float("inf"), "t1"),
    (float("-inf"), 0.0, "t0"), (np.float64(1.0), np.float64(-np.inf), "t1"),
])
@pytest.mark.parametrize("method, kwargs", [("dopri5", {}), ("rk4", dict(step_size=0.1))])
def test_non_finite_times_raise(t0, t1, name, method, kwargs):
    # Before: dopri5 returned y0 with status max_steps_reached after no
    # step at all; rk4 failed inside math.ceil with a message about NaN.
    for as_tensor in (False, True):
        if as_tensor:
            t0, t1 = (ops.convert_to_tensor(np.float64(v), "float64") for v in (t0, t1))
        with pytest.raises(ValueError, match=f"{name} must be a finite number, got .*(nan|inf)"):
            kr.odeint(_decay, f64([1.0]), t0, t1, method=method, **kwargs)


def test_non_finite_times_raise_while_tracing():
    if BACKEND == "torch":
        pytest.skip("PyTorch runs eagerly: covered by test_non_finite_times_raise")

    def solve(y0):
        return kr.odeint(_decay, y0, 0.0, float("nan")).y

    with pytest.raises(ValueError, match="t1 must be a finite number"):
        compiled(solve, MODES[-1])(f64([1.0]))


def test_bad_y0_and_func():
    with pytest.raises(ValueError, match="y0"):
        kr.odeint(_decay, ops.convert_to_tensor([1, 2], "int32"))
    with pytest.raises(ValueError, match="y0"):
        kr.odeint(_decay, np.array([1, 2]))
    with pytest.raises(ValueError, match="y0"):
        kr.odeint(lambda t, y: y, (f64([1.0]), f32([1.0])))
    with pytest.raises(ValueError, match="func"):
        kr.odeint("not callable", f64([1.0]))
    # Wrong shape.
    with pytest.raises(ValueError, match="func"):
        kr.odeint(lambda t, y: ops.concatenate([y, y]), f64([1.0, 2.0]))
    # Wrong structure: a tensor for a tuple state, a tuple for a tensor.
    with pytest.raises(ValueError, match="func"):
        kr.odeint(lambda t, y: y[0], (f64([1.0]), f64([2.0])))
    with pytest.raises(ValueError, match="func"):
        kr.odeint(lambda t, y: (y, y), f64([1.0]))
    with pytest.raises(ValueError, match="func"):
        kr.odeint(lambda t, y: ops.zeros((3,), "float64"), f64([1.0, 2.0]), method="rk4",
                  step_size=0.5)
