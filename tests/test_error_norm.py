"""The error norm: "rms" over the whole batch, or "per_sample" (issue 26.4; diffrax#213).

One hard sample (a rotation at angular frequency 20) among easy ones
(frequency 0.01): under the RMS its error grows with the batch, under the
per-sample norm it stays what it is alone. Exact solution y = R(w t) y0.
"""

import numpy as np
import pytest
from keras import ops

import keras_rnode as kr
from keras_rnode.solvers import norms
from keras_rnode.solvers.settings import SettingError, SolverSettings
from tests.backend_utils import MODES, compiled, f64, gradients, np_

pytestmark = pytest.mark.backends

HARD, EASY = 20.0, 0.01


def stats(sol):
    return {k: int(np_(v)) for k, v in sol.stats.items()}


def _rotations(n):
    """(func, y0, exact y(1)) of n rotations: the first hard, the others easy."""
    w = np.array([HARD] + [EASY] * (n - 1))
    rate = f64(w[:, None])

    def func(t, y):
        return rate * ops.stack([-y[:, 1], y[:, 0]], axis=-1)

    y0 = np.tile([[1.0, 0.0]], (n, 1))
    return func, f64(y0), np.stack([np.cos(w), np.sin(w)], axis=-1)


def _hard_error(n, error_norm):
    func, y0, exact = _rotations(n)
    sol = kr.odeint(func, y0, 0.0, 1.0, rtol=1e-6, atol=1e-6, error_norm=error_norm,
                    gradient="none")
    assert sol.status == "success"
    return float(np.max(np.abs(np_(sol.y)[0] - exact[0]))), stats(sol)


def test_per_sample_norm_keeps_a_hard_samples_error_in_any_batch():
    # The numbers: alone 7.0e-6 in 74 steps; under the RMS beside
    # 9, 99, 999 easy samples 2.5e-5, 8.8e-5, 3.2e-4 (46x) in 58, 46, 37.
    alone, alone_stats = _hard_error(1, "rms")
    assert 6e-6 < alone < 8e-6 and alone_stats["accepted"] == 74
    rms = [_hard_error(n, "rms") for n in (10, 100, 1000)]
    assert [e for e, _ in rms] == sorted(e for e, _ in rms) and rms[-1][0] > 30 * alone
    assert rms[-1][1]["accepted"] < 40
    for n in (1, 10, 100, 1000):
        error, per_sample = _hard_error(n, "per_sample")
        assert error <= 2 * alone, (n, error, alone)
        # The hard sample alone sizes the steps: those of its own solve.
        assert per_sample["accepted"] == alone_stats["accepted"], (n, per_sample)


def test_norms_against_numpy():
    rng = np.random.default_rng(0)
    x, logp = rng.normal(size=(5, 3)), rng.normal(size=(5,))
    sx, sl = rng.uniform(0.5, 2.0, size=(5, 3)), rng.uniform(0.5, 2.0, size=(5,))
    # Each sample's RMS over its own 4 entries (3 of x, 1 of logp) ...
    rows = np.sqrt((np.sum((x / sx) ** 2, axis=1) + (logp / sl) ** 2) / 4)
    got = norms.norms([f64(x), f64(logp)], [f64(sx), f64(sl)], "per_sample")
    np.testing.assert_allclose(np_(got), rows, rtol=1e-13)
    np.testing.assert_allclose(np_(norms.worst(got)), rows.max(), rtol=1e-13)
    # ... and the RMS over all 20.
    every = np.sqrt((np.sum((x / sx) ** 2) + np.sum((logp / sl) ** 2)) / 20)
    got = norms.norms([f64(x), f64(logp)], [f64(sx), f64(sl)], "rms")
    np.testing.assert_allclose(np_(got), [every], rtol=1e-13)
    # A NaN anywhere makes the worst NaN (the step is rejected); nothing is 0.
    assert np.isnan(np_(norms.worst(f64([0.5, np.nan, 0.2]))))
    assert np_(norms.worst(f64(np.zeros((0,))))) == 0.0


def test_per_sample_compiles():
    # Where the backend compiles (XLA on TensorFlow, jax.jit): the steps of eager.
    func, y0, exact = _rotations(3)
    run = compiled(lambda y: kr.odeint(func, y, 0.0, 1.0, rtol=1e-6, atol=1e-6,
                                       error_norm="per_sample", gradient="none").stats,
                   MODES[-1])
    assert {k: int(np_(v)) for k, v in run(y0).items()} == _hard_error(1, "rms")[1]


def test_per_sample_gradient_matches_rms_gradient_of_one_sample():
    # One sample: the two norms are one norm, the same steps (forward and
    # adjoint) and gradients; and the gradient is R(w)^T summed, exactly.
    func, y0, _ = _rotations(1)
    grads = {}
    for error_norm in ("rms", "per_sample"):
        def loss(y, error_norm=error_norm):
            return ops.sum(kr.odeint(func, y, 0.0, 0.25, rtol=1e-8, atol=1e-8,
                                     error_norm=error_norm, gradient="adjoint").y)

        grads[error_norm] = np_(gradients(loss, [y0])[1][0])
    np.testing.assert_array_equal(grads["per_sample"], grads["rms"])
    c, s = np.cos(HARD * 0.25), np.sin(HARD * 0.25)
    np.testing.assert_allclose(grads["rms"], [[c + s, c - s]], rtol=1e-6)


def test_per_sample_needs_a_common_leading_axis():
    def func(t, y):
        return tuple(-v for v in y)

    with pytest.raises(ValueError, match=r'per_sample" needs the controlled states to share '
                                         r"their leading \(sample\) axis; got shapes "
                                         r"\[\(3, 2\), \(4,\)\]"):
        kr.odeint(func, (f64(np.ones((3, 2))), f64(np.ones(4))), error_norm="per_sample")
    with pytest.raises(ValueError, match="needs a leading sample axis on every controlled "
                                         "state; got a scalar"):
        kr.odeint(func, (f64(np.ones((3, 2))), f64(1.0)), error_norm="per_sample")
    # A state left out of error control may have any shape.
    sol = kr.odeint(func, (f64(np.ones((3, 2))), f64(np.ones(4))), error_norm="per_sample",
                    error_control=(True, False), gradient="none")
    np.testing.assert_allclose(np_(sol.y[1]), np.full(4, np.exp(-1.0)), rtol=1e-4)


def test_error_norm_is_a_setting():
    settings = SolverSettings(error_norm="per_sample")
    assert settings.error_norm == settings.controller.error_norm == "per_sample"
    assert SolverSettings.from_config(settings.to_config()) == settings
    assert settings.describe() == "dopri5 rtol=1e-05 atol=1e-05 error_norm=per_sample"
    with pytest.raises(SettingError, match=r"error_norm must be one of \('rms', 'per_sample'\)"):
        SolverSettings(error_norm="max")


def test_cnf_takes_the_error_norm_for_training_and_evaluation():
    cnf = kr.layers.CNF(kr.layers.ConcatSquashMLP(hidden=(4,)), error_norm="per_sample",
                        eval_error_norm="rms")
    assert cnf.train_solver.error_norm == "per_sample" and cnf.eval_solver.error_norm == "rms"
    loaded = kr.layers.CNF.from_config(cnf.get_config())
    assert (loaded.train_solver, loaded.eval_solver) == (cnf.train_solver, cnf.eval_solver)
    cnf.set_evaluation(error_norm="per_sample")
    assert cnf.eval_solver.error_norm == "per_sample"
    with pytest.raises(ValueError, match="eval_error_norm must be one of"):
        kr.layers.CNF(kr.layers.ConcatSquashMLP(hidden=(4,)), eval_error_norm="max")
