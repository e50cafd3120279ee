"""The private Keras (and two TensorFlow, one TensorFlow Probability) names keras-rnode relies
on are still there, as we use them.

NaN-skipping (`SkipBadSteps`), exact resume (`StepBackup`) and the
logged loss of skipped steps (`RNODE.compile`) override or read Keras
attributes that are not public API; the TFP bijector shares a solve
between a value and its log-det through a TFP-internal cache. A release
may rename or reshape them without warning, and the package would then go
on running, wrongly: each test below names the attribute, the keras_rnode
file that relies on it and what breaks. The upper bounds on `keras` and
`tensorflow-probability` in setup.cfg are the newest versions these tests
passed on; raise one only after they pass.
"""

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Optional

import keras
import numpy as np
import pytest

from keras_rnode.optimizers import SkipBadSteps
from keras_rnode.resumable import StepBackup

pytestmark = pytest.mark.backends


def compiled_model(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def started_backup(tmp_path):
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    backup.set_model(compiled_model(tmp_path))
    backup.on_train_begin()
    return backup


def built_loss_scale_optimizer(tmp_path):
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD())
    optimizer.build([keras.Variable(np.zeros(2, "float32"))])
    return optimizer


def leads_the_optimizer_variables(optimizer):
    # SkipBadSteps splits the stateless optimizer variables at len(_variables).
    own = list(optimizer._variables)
    return all(a is b for a, b in zip(optimizer.variables[:len(own)], own))


@dataclass(frozen=True)
class Reliance:
    name: str
    owner: str  # the Keras class that defines it
    user: str  # where keras_rnode relies on it
    breaks: str  # what goes wrong without it
    holder: Callable  # tmp_path -> the class or instance that must have `name`
    override: Optional[type] = None  # our subclass: a method whose parameters must match
    expect: Optional[Callable] = None  # holder -> bool: what else we take for granted
    expectation: str = ""  # `expect`, in words

    def problem(self, what):
        return (f"keras {keras.__version__}: {self.owner}.{self.name} {what}. "
                f"{self.user} relies on it as it was; otherwise {self.breaks}. Adapt "
                "that code before raising the keras bound in setup.cfg.")


BACKUP = "keras.callbacks.BackupAndRestore"
RESUMABLE = "keras_rnode/resumable.py"
OPTIMIZER = "keras.optimizers.LossScaleOptimizer"
OPTIMIZERS = "keras_rnode/optimizers.py"
# Keras's own handling, which would run in place of an override it no longer calls.
GOOD_STEPS_SCALED = ("good steps go through Keras's loss scaling, which divides the "
                     "gradients by a growing scale")
BAD_STEPS_UNCOUNTED = "bad steps halve the loss scale instead of being counted in `skipped`"


def step_backup_hook(name, breaks):
    """A private BackupAndRestore method that StepBackup overrides."""
    return Reliance(name, BACKUP, f"{RESUMABLE} (StepBackup)", f"exact resume breaks: {breaks}",
                    lambda tmp_path: keras.callbacks.BackupAndRestore, override=StepBackup)


def skip_bad_steps_hook(name, backends, breaks):
    """A private LossScaleOptimizer method that SkipBadSteps overrides."""
    return Reliance(name, OPTIMIZER, f"{OPTIMIZERS} (SkipBadSteps)",
                    f"NaN-skipping breaks on {backends}: {breaks}",
                    lambda tmp_path: keras.optimizers.LossScaleOptimizer,
                    override=SkipBadSteps)


RELIANCES = [
    Reliance(
        "_loss_tracker", "keras.Model", "keras_rnode/models/rnode.py (RNODE.compile)",
        "a step that SkipBadSteps skipped averages its NaN loss into the logged loss",
        compiled_model,
        expect=lambda model: isinstance(model._loss_tracker, keras.metrics.Mean),
        expectation="a keras.metrics.Mean after compile"),
    Reliance(
        "_initial_epoch", "keras.Model", f"{RESUMABLE} (StepBackup._load_model)",
        "exact resume breaks: a resumed fit counts its epochs from 0 again",
        compiled_model),
    step_backup_hook("_load_model", "the step and the seed-generator states are not restored"),
    step_backup_hook("_save_model", "checkpoints are not atomic and lack the step and the "
                                    "seed-generator states"),
    Reliance(
        "_current_epoch", BACKUP, f"{RESUMABLE} (StepBackup._load_model, _save_model)",
        "exact resume breaks: checkpoints cannot be written, or record a stale epoch",
        started_backup),
    Reliance(
        "_last_batch_seen", BACKUP, f"{RESUMABLE} (StepBackup._save_model)",
        "checkpoints cannot be written: their metadata records the batch",
        started_backup),
    skip_bad_steps_hook("_stateful_handle_finite_grads", "TensorFlow and PyTorch",
                        GOOD_STEPS_SCALED),
    skip_bad_steps_hook("_stateful_handle_non_finite_grads", "TensorFlow and PyTorch",
                        BAD_STEPS_UNCOUNTED),
    skip_bad_steps_hook("_stateless_handle_finite_grads", "JAX", GOOD_STEPS_SCALED),
    skip_bad_steps_hook("_stateless_handle_non_finite_grads", "JAX", BAD_STEPS_UNCOUNTED),
    Reliance(
        "_variables", OPTIMIZER,
        f"{OPTIMIZERS} (SkipBadSteps._stateless_handle_finite_grads)",
        "NaN-skipping breaks on JAX: the wrapper's own variables cannot be told from "
        "the inner optimizer's",
        built_loss_scale_optimizer,
        expect=leads_the_optimizer_variables,
        expectation="the first of a built optimizer's variables"),
]


@pytest.mark.parametrize("reliance", RELIANCES, ids=lambda r: r.name)
def test_private_keras_name_is_still_there(reliance, tmp_path):
    holder = reliance.holder(tmp_path)
    assert hasattr(holder, reliance.name), reliance.problem("is gone")
    if reliance.override is not None:
        theirs = list(inspect.signature(getattr(holder, reliance.name)).parameters)
        ours = list(inspect.signature(getattr(reliance.override, reliance.name)).parameters)
        assert theirs == ours, reliance.problem(
            f"now takes ({', '.join(theirs)}), where {reliance.override.__name__} "
            f"overrides it taking ({', '.join(ours)})")
    if reliance.expect is not None:
        assert reliance.expect(holder), reliance.problem(
            f"is no longer {reliance.expectation}")


def test_seed_generator_state_keeps_its_name():
    # StepBackup finds the seed generators' states among a model's variables by
    # this name; renamed, a resumed run would draw other noise without a word.
    layer = keras.layers.Dropout(0.5, seed=1)
    names = [v.name for v in layer.variables]
    assert "seed_generator_state" in names, (
        f"keras {keras.__version__}: a SeedGenerator's variable is now named {names}; "
        f"{RESUMABLE} (StepBackup._seed_states) looks for 'seed_generator_state', so exact "
        "resume would restore no random-seed state")


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's own names")
def test_tensorflow_tape_queries_still_answer():
    # keras_rnode/backend/tensorflow.py (_recorded_captures) asks the tapes whether a
    # tensor that dynamics capture from outside a solve needs a gradient.
    import tensorflow as tf
    from tensorflow.python.eager import record

    problem = (f"tensorflow {tf.__version__}: tensorflow.python.eager.record.%s answers "
               "otherwise; keras_rnode/backend/tensorflow.py relies on it, or tensors "
               "captured by dynamics silently get no gradient")
    x = tf.constant(1.0)
    assert not record.could_possibly_record(), problem % "could_possibly_record"
    with tf.GradientTape() as tape:
        tape.watch(x)
        assert record.could_possibly_record(), problem % "could_possibly_record"
        assert record.should_record_backprop([2.0 * x]), problem % "should_record_backprop"
        assert not record.should_record_backprop([tf.constant(2.0)]), (
            problem % "should_record_backprop")


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's trainer")
def test_a_model_made_under_a_strategy_still_knows_it():
    # keras_rnode/backend/distribute.py (fit_input) tells by the model's private
    # `_distribute_strategy` whether Keras's TensorFlow trainer builds it symbolically
    # from a first pass over fit's input (`_maybe_symbolic_build`); otherwise a run
    # resumed on several devices trains on other batches than an uninterrupted one.
    import tensorflow as tf

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        model = compiled_model(None)
    problem = (f"keras {keras.__version__}: the TensorFlow trainer's %s changed; "
               "keras_rnode/backend/distribute.py (fit_input) relies on it, or a resumed "
               "multi-device run silently trains on other batches")
    assert getattr(model, "_distribute_strategy", None) is strategy, (
        problem % "_distribute_strategy")
    assert getattr(compiled_model(None), "_distribute_strategy", 0) is None, (
        problem % "_distribute_strategy")
    assert hasattr(model, "_maybe_symbolic_build"), problem % "_maybe_symbolic_build"


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TFP runs on TensorFlow")
def test_tfp_greedy_bijector_cache_still_shares_one_pass():
    # keras_rnode/distributions.py (RNODEBijector._cache) builds TFP's internal
    # BijectorCacheWithGreedyAttrs(forward_name=..., inverse_name=...): each call of the
    # named method returns (value, {"fldj", "ildj"}), so the log-det query after a value
    # call reads the cache instead of solving again, and clear() forgets old entries.
    tfp = pytest.importorskip("tensorflow_probability")
    import tensorflow as tf

    problem = (f"tensorflow-probability {tfp.__version__}: "
               "tensorflow_probability.python.internal.cache_util.BijectorCacheWithGreedyAttrs "
               "%s. keras_rnode/distributions.py (RNODEBijector) relies on it as it was; "
               "otherwise as_distribution does not import, or solves twice per log_prob, or "
               "answers from weights it had before. Adapt that code before raising the "
               "tensorflow-probability bound in setup.cfg.")
    try:
        from tensorflow_probability.python.internal.cache_util import (
            BijectorCacheWithGreedyAttrs,
        )
    except ImportError:
        pytest.fail(problem % "is gone")
    params = list(inspect.signature(BijectorCacheWithGreedyAttrs).parameters)
    assert {"forward_name", "inverse_name"} <= set(params), problem % (
        f"now takes ({', '.join(params)}), not forward_name and inverse_name")
    calls = []

    class Double(tfp.bijectors.Bijector):
        _cache = BijectorCacheWithGreedyAttrs(forward_name="_forward_and_log_det",
                                              inverse_name="_inverse_and_log_det")

        def __init__(self):
            super().__init__(forward_min_event_ndims=0, parameters={}, name="double")

        @classmethod
        def _parameter_properties(cls, dtype):
            return {}

        def _forward_and_log_det(self, x):
            calls.append("forward")
            log_det = tf.fill(tf.shape(x), math.log(2.0))
            return 2.0 * x, {"fldj": log_det, "ildj": -log_det}

        def _inverse_and_log_det(self, y):
            calls.append("inverse")
            log_det = tf.fill(tf.shape(y), -math.log(2.0))
            return y / 2.0, {"ildj": log_det, "fldj": -log_det}

        def _forward(self, x):
            return self._forward_and_log_det(x)[0]

        def _inverse(self, y):
            return self._inverse_and_log_det(y)[0]

        def _forward_log_det_jacobian(self, x):
            return self._forward_and_log_det(x)[1]["fldj"]

    bijector, x = Double(), tf.constant([1.0, 3.0])
    y = bijector.forward(x)
    fldj = bijector.forward_log_det_jacobian(x, event_ndims=0)
    ildj = bijector.inverse_log_det_jacobian(y, event_ndims=0)
    assert calls == ["forward"], problem % f"no longer shares one pass (calls: {calls})"
    np.testing.assert_allclose(fldj.numpy(), [math.log(2.0)] * 2, rtol=1e-6)
    np.testing.assert_allclose(ildj.numpy(), [-math.log(2.0)] * 2, rtol=1e-6)
    bijector._cache.clear()
    bijector.forward_log_det_jacobian(x, event_ndims=0)
    assert calls == ["forward", "forward"], problem % "no longer forgets its entries on clear()"
