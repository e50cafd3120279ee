"""Reliability: diverging dynamics, NaN data, step-limit blow-ups, reproducibility, validation."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_rnode as kr
from keras_rnode.callbacks import BadSteps, NFEWatch, SolverFailures
from keras_rnode.datasets import make_dataset, toy
from keras_rnode.evaluation import log_prob_batches
from keras_rnode.optimizers import SkipBadSteps
from keras_rnode.resumable import StepBackup
from tests.backend_utils import build_optimizer


@keras.saving.register_keras_serializable(package="test_reliability")
class Fuse(keras.layers.Layer):
    """dz/dt = tanh(z W) + boost * z^3: tame until `boost` is set, then the solve overflows."""

    def build(self, t_shape, z_shape=None):
        dim = (z_shape or t_shape)[-1]
        self.w = self.add_weight(shape=(dim, dim), initializer="glorot_uniform", name="w")
        self.boost = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                     name="boost")

    def call(self, t, z):
        return keras.ops.tanh(z @ self.w) + self.boost * z ** 3


def fuse_model(method="rk4", **solver):
    solver = solver or {"step_size": 0.25}
    # direct: the gradient traces faster than the adjoint's, which these tests do not need
    cnf = kr.layers.CNF(Fuse(), trace="exact", method=method, seed=0, gradient="direct",
                        **solver)
    model = kr.RNODE([cnf], seed=0)
    model.build((None, 2))  # not by a call: a tight model's evaluation solve fails
    return model


def weights(model):
    return [w.numpy().copy() for w in model.trainable_weights]


class BlowUpAfter(keras.callbacks.Callback):
    """Sets the fuse after `good` steps and remembers the weights at that moment."""

    def __init__(self, good):
        super().__init__()
        self.good, self.last_good = good, None

    def on_train_batch_end(self, batch, logs=None):
        if batch + 1 == self.good:
            self.last_good = weights(self.model)
            self.model.blocks[0].dynamics.boost.assign(1e4)


X = toy("8gaussians", 512, seed=0)


def stream():
    return make_dataset(X, 64, seed=0, repeat=True)


# ------------------------------------------------------------- NaN / inf --


@pytest.mark.parametrize("jit", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_diverging_dynamics_skips_bad_steps_and_keeps_good_weights(jit):
    model = fuse_model()
    model.compile(optimizer=SkipBadSteps(keras.optimizers.Adam(1e-2)), jit_compile=jit)
    build_optimizer(model)
    fuse, watch = BlowUpAfter(3), BadSteps("skip")
    with pytest.warns(RuntimeWarning, match="skipped 5 step"):
        history = model.fit(stream(), epochs=1, steps_per_epoch=8, verbose=0,
                            callbacks=[fuse, watch])
    assert int(model.optimizer.skipped.numpy()) == 5
    assert int(model.optimizer.iterations.numpy()) == 3  # skipped steps do not count
    for now, then in zip(weights(model), fuse.last_good):
        np.testing.assert_array_equal(now, then)
    # The epoch's means leave the skipped steps out, and the count is logged.
    assert np.isfinite(history.history["loss"][0]) and np.isfinite(history.history["nll"][0])
    assert history.history["skipped_steps"] == [5]


def test_diverging_dynamics_stop_ends_at_the_first_bad_step():
    model = fuse_model()
    model.compile(optimizer=SkipBadSteps(keras.optimizers.Adam(1e-2)), jit_compile=False)
    build_optimizer(model)
    fuse, watch = BlowUpAfter(2), BadSteps("stop")
    with pytest.warns(RuntimeWarning, match="stopping training: a NaN or inf"):
        model.fit(stream(), epochs=3, steps_per_epoch=4, verbose=0, callbacks=[fuse, watch])
    assert "step 3" in watch.stop_reason
    assert int(model.optimizer.skipped.numpy()) == 1
    for now, then in zip(weights(model), fuse.last_good):
        np.testing.assert_array_equal(now, then)


def test_nan_in_numpy_data_is_an_error_before_the_first_step():
    model = fuse_model()
    model.compile(optimizer="adam")
    x = X.copy()
    x[37, 1] = np.nan
    with pytest.raises(ValueError, match="row 37"):
        model.fit(x, epochs=1, batch_size=64, verbose=0)
    assert model.optimizer.iterations.numpy() == 0
    with pytest.raises(ValueError, match="row 37"):
        make_dataset(x, 64)


# ----------------------------------------------------------- step limit --


def test_a_solve_with_max_steps_3_ends_with_that_status():
    sol = kr.odeint(lambda t, y: -50.0 * y, tf.ones((4,)), method="dopri5",
                    rtol=1e-6, atol=1e-6, max_steps=3)
    assert sol.status == "max_steps_reached"
    assert int(sol.stats["accepted"]) + int(sol.stats["rejected"]) <= 3


def tight_model():
    """rk4 needs 4 steps of 0.25 to reach T = 1; it gets 3."""
    return fuse_model(method="rk4", step_size=0.25, max_steps=3)


@pytest.mark.parametrize("action", ["warn", "skip", "stop"])
def test_training_solves_hitting_max_steps(action):
    model = tight_model()
    before = weights(model)
    guard = model.solves_succeeded if action != "warn" else None
    model.compile(optimizer=SkipBadSteps(keras.optimizers.Adam(1e-2), guard=guard),
                  jit_compile=False)
    build_optimizer(model)
    watch = SolverFailures(action)
    with pytest.warns(RuntimeWarning, match="max_steps"):
        history = model.fit(stream(), epochs=2, steps_per_epoch=2, verbose=0,
                            callbacks=[watch])
    moved = not np.array_equal(weights(model)[0], before[0])
    if action == "warn":
        assert history.history["solver_failures"] == [2, 2] and watch.counts == [2, 2]
        assert moved
    elif action == "skip":
        assert watch.counts == [2, 2] and int(model.optimizer.skipped.numpy()) == 4
        assert not moved
    else:
        assert "max_steps_reached" in watch.stop_reason and len(history.history["loss"]) == 1
        assert not moved


def test_skip_on_max_steps_needs_the_guard():
    model = tight_model()
    model.compile(optimizer=SkipBadSteps(keras.optimizers.Adam()), jit_compile=False)
    with pytest.raises(ValueError, match="guard=model.solves_succeeded"):
        model.fit(stream(), epochs=1, steps_per_epoch=1, verbose=0,
                  callbacks=[SolverFailures("skip")])


def test_evaluation_names_the_batch_whose_solve_failed():
    model = fuse_model(method="dopri5", rtol=1e-6, atol=1e-6, max_steps=40)
    x = X[:30].copy()
    x[25] = 1e3  # z' = 1e-6 z^3 blows up before T from here only: only its batch fails
    model.blocks[0].dynamics.boost.assign(1e-6)
    with pytest.raises(ValueError, match=r"batch 2 \(rows 20 to 29\) ended with status"):
        log_prob_batches(model, x, batch_size=10)
    _, _, status = log_prob_batches(model, x, batch_size=10, strict=False)
    assert status != "success"
    log_prob_batches(model, x[:20], batch_size=10)  # the others are fine


def test_evaluation_names_the_batch_whose_fixed_step_solve_went_non_finite():
    # rk4 at step 0.25 takes whatever comes: z' = boost z^3 overflows float32
    # from row 15 on. It used to report success and return NaN log-densities.
    model = fuse_model()
    x = X[:30].copy()
    x[15] = 1e5
    model.blocks[0].dynamics.boost.assign(1e-3)
    with pytest.raises(ValueError, match=r"batch 1 \(rows 10 to 19\) ended with status "
                                         "non_finite_state"):
        log_prob_batches(model, x, batch_size=10)
    log_p, _, status = log_prob_batches(model, x, batch_size=10, strict=False)
    assert status == "non_finite_state" and not np.isfinite(log_p[15])


def test_evaluating_an_unbuilt_model_is_a_one_line_error():
    model = kr.RNODE([kr.layers.CNF(kr.layers.ConcatSquashMLP(hidden=(4,)))])
    with pytest.raises(ValueError, match="not built"):
        log_prob_batches(model, X[:4])


# ----------------------------------------------------------------- NFE --


def test_nfe_watch_warns_then_stops():
    model = fuse_model()  # rk4, 4 steps of 4 evaluations: NFE 16 per step
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
    build_optimizer(model)
    watch = NFEWatch(limit=7)
    with pytest.warns(RuntimeWarning, match="NFE 16 in epoch 1, step 1 is past the limit of 7"):
        model.fit(stream(), epochs=1, steps_per_epoch=2, verbose=0, callbacks=[watch])
    assert watch.first_exceeded == (0, 0, 16) and watch.stop_reason is None
    stop = NFEWatch(limit=7, stop=True)
    with pytest.warns(RuntimeWarning, match="stopping training"):
        history = model.fit(stream(), epochs=3, steps_per_epoch=2, verbose=0, callbacks=[stop])
    assert stop.stop_reason and len(history.history["loss"]) == 1
    quiet = NFEWatch(limit=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model.fit(stream(), epochs=1, steps_per_epoch=1, verbose=0, callbacks=[quiet])
    assert quiet.first_exceeded is None


# ------------------------------------------------------- reproducibility --


def train_a_few_steps(seed, wrap):
    keras.utils.set_random_seed(seed)
    cnf = kr.layers.CNF(kr.layers.ConcatSquashMLP(hidden=(8,)), trace="hutchinson",
                        method="rk4", step_size=0.5, gradient="direct", seed=seed)
    model = kr.RNODE([cnf], seed=seed)
    model.build((None, 2))
    adam = keras.optimizers.Adam(1e-2)
    model.compile(optimizer=SkipBadSteps(adam) if wrap else adam, jit_compile=False)
    build_optimizer(model)
    history = model.fit(make_dataset(X, 64, seed=seed, repeat=True), epochs=4,
                        steps_per_epoch=1, verbose=0)
    return history.history["loss"], weights(model)


def test_same_seed_same_loss_curve_and_skip_bad_steps_changes_no_good_step():
    """Weights, Hutchinson noise and data order all follow the seed; wrapping the
    optimizer in SkipBadSteps changes nothing while every step is finite."""
    curve, final = train_a_few_steps(3, wrap=False)
    again, final_again = train_a_few_steps(3, wrap=True)
    assert again == curve
    for a, b in zip(final, final_again):
        np.testing.assert_array_equal(a, b)
    assert len(set(curve)) == len(curve)  # it trained: the curve is not flat


# ----------------------------------------------------------- validation --


@pytest.mark.parametrize("make, words", [
    (lambda: NFEWatch(0), "positive"),
    (lambda: SolverFailures("ignore"), "warn"),
    (lambda: BadSteps("warn"), "skip"),
    (lambda: StepBackup("somewhere", 0), "positive"),
    (lambda: SkipBadSteps("adam"), "Optimizer"),
    (lambda: SkipBadSteps(keras.optimizers.Adam(), guard=3), "callable"),
    (lambda: kr.RNODE([kr.layers.CNF(Fuse())], kinetic="a"), "kinetic must be a number"),
    (lambda: kr.datasets.toy("moon", 10), "moons"),
    (lambda: kr.datasets.toy("pinwheel", 0), "n must be"),
    (lambda: kr.odeint(lambda t, y: y, np.ones(3, "int32")), "floating point"),
    (lambda: kr.odeint(lambda t, y: y, np.ones(3, "float32"), method="rk45"), "dopri5"),
    (lambda: kr.layers.CNF(Fuse(), trace="exactly"), "hutchinson"),
])
def test_bad_arguments_say_what_was_expected(make, words):
    with pytest.raises(ValueError, match=words):
        make()


def test_data_of_the_wrong_event_shape_is_named():
    with pytest.raises(ValueError, match=r"events of shape \(2,\)"):
        fuse_model().log_prob(np.zeros((4, 3), np.float32))
