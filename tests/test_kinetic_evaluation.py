"""The kinetic energy `evaluate_model` reports beside the held-out figure.

- It is the mean over the rows of `model.penalties(x, names=["kinetic"])`
  in the same batches, for a flat and an image model.
- A training solve that stops short gives no number, and says why.
- kinetic=False leaves it out.

Runs under every Keras backend.
"""

import numpy as np
import pytest

import keras_rnode as kr
from keras_rnode.evaluation import describe_result, evaluate_model, kinetic_batches
from tests.backend_utils import BACKEND, np_

pytestmark = pytest.mark.backends


def moving(model, x):
    """`model` built on x, with weights that move the points (the last layer starts at 0)."""
    model.log_prob(x[:2])
    rng = np.random.default_rng(0)
    for w in model.trainable_weights:
        w.assign(rng.normal(0, 0.3, w.shape).astype("float32"))
    return model


def toy(**solver):
    cnf = kr.layers.CNF(kr.layers.ConcatSquashMLP(hidden=(8,)), trace="exact", method="rk4",
                        step_size=0.25, eval_method="rk4", eval_step_size=0.25, seed=0,
                        **solver)
    x = kr.datasets.toy("8gaussians", 10, seed=1)
    return moving(kr.RNODE([cnf]), x), x


def digits():
    cnf = kr.layers.CNF(kr.layers.ConcatSquashConvNet(channels=(4,)), trace="hutchinson",
                        method="rk4", step_size=0.5, eval_method="rk4", eval_step_size=0.5,
                        seed=0)
    (x, _), _ = kr.datasets.digits()
    model = kr.RNODE([cnf], levels=kr.datasets.DIGITS_LEVELS, logit_alpha=0.05, seed=0)
    return moving(model, x[:8]), x[:8]


@pytest.mark.parametrize("make", [
    toy,
    # Eager JAX retraces each conv solve: 30 s on 2 shared cores, 6 s on TensorFlow.
    pytest.param(digits, marks=[pytest.mark.slow] if BACKEND == "jax" else []),
], ids=["toy", "digits"])
def test_the_kinetic_energy_is_the_mean_of_the_flows_per_sample_integral(make):
    model, x = make()

    def eager(batch_size):  # images: each batch dequantized from the evaluation seed
        return float(np.mean(np.concatenate([
            np_(model.penalties(x[i:i + batch_size], names=["kinetic"])["kinetic"])
            for i in range(0, len(x), batch_size)])))

    for batch_size in (len(x), len(x) // 2):  # equal batches: JAX compiles one shape
        expected = eager(batch_size)
        kinetic, status = kinetic_batches(model, x, batch_size)
        assert status == "success" and kinetic > 1e-3
        assert kinetic == pytest.approx(expected, rel=1e-5)
    result = evaluate_model(model, x, len(x) // 2, midpoint=False)
    assert result["kinetic"] == pytest.approx(expected, rel=1e-5)
    assert result["kinetic_seconds"] >= 0 and "kinetic_status" not in result
    assert f"kinetic energy {expected:.4g}" in describe_result("data", result)
    lean = evaluate_model(model, x, len(x) // 2, midpoint=False, kinetic=False)
    assert "kinetic" not in lean and "kinetic_seconds" not in lean
    assert "kinetic" not in describe_result("data", lean)
    assert lean["nll"] == pytest.approx(result["nll"], rel=1e-6)


def test_a_training_solve_that_stops_short_gives_no_kinetic_energy():
    # dopri5 in training, bounded at one step; evaluation stays on rk4 and succeeds.
    model, x = toy()
    model.blocks[0].train_solver = kr.SolverSettings(method="dopri5", rtol=1e-6, atol=1e-6,
                                                     max_steps=1, gradient="direct")
    result = evaluate_model(model, x, 5, midpoint=False)
    assert result["status"] == "success" and np.isfinite(result["nll"])
    assert result["kinetic"] is None and result["kinetic_status"] == "max_steps_reached"
    assert "kinetic energy n/a, a training solve ended with status max_steps_reached" in (
        describe_result("data", result))
