"""Evaluation you can trust: the same input gives the same log-density every time.

A Hutchinson-trained 2-D model (whose evaluation trace is then exact by the
rule) and a digits model (Hutchinson at evaluation, probes from a fixed
seed, dequantization noise from a fixed seed): two `log_prob` calls, the
`.keras` round trip and the SavedModel agree to 1e-5 (relative 1e-6 where
float32 cannot resolve 1e-5: a digit's log p is about -100 nats). Averaging K probes
reports a standard error that shrinks as 1/sqrt(K); a model loaded from
`.keras` trains on without compile().
"""

import keras
import numpy as np
import pytest

import keras_rnode as kr
from keras_rnode.evaluation import evaluate_model
from tests.backend_utils import BACKEND, np_

pytestmark = pytest.mark.backends
JIT = BACKEND == "jax"


def trained_toy():
    keras.utils.set_random_seed(0)
    cnf = kr.layers.CNF(kr.layers.ConcatSquashMLP(hidden=(16, 16)), trace="hutchinson",
                        method="rk4", step_size=0.25, seed=0)
    model = kr.RNODE([cnf])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=JIT)
    model.fit(kr.datasets.toy("8gaussians", 512, seed=0), batch_size=128, epochs=1, verbose=0)
    return model, kr.datasets.toy("8gaussians", 128, seed=1)


def digits_model():
    keras.utils.set_random_seed(0)
    cnf = kr.layers.CNF(kr.layers.ConcatSquashConvNet(channels=(4,), zero_init_last=False),
                        trace="hutchinson", method="rk4", step_size=0.5, seed=0)
    model = kr.RNODE([cnf], levels=kr.datasets.DIGITS_LEVELS, logit_alpha=0.05, seed=0)
    (x, _), _ = kr.datasets.digits()
    return model, x[:16]


@pytest.mark.parametrize("make", [trained_toy, digits_model], ids=["toy", "digits"])
def test_log_prob_is_the_same_on_every_call_reloaded_and_exported(make, tmp_path):
    model, x = make()
    first = np_(model.log_prob(x))
    np.testing.assert_allclose(np_(model.log_prob(x)), first, rtol=1e-6, atol=1e-5)
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(np_(reloaded.log_prob(x)), first, rtol=1e-6, atol=1e-5)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        exported = tf.saved_model.load(model.export(str(tmp_path / "exported")))
        floats = np.asarray(x, "float32")
        np.testing.assert_allclose(exported.log_prob(floats).numpy(), first, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(exported.log_prob(floats).numpy(), first, rtol=1e-6, atol=1e-5)


def test_the_evaluation_trace_is_exact_where_the_event_is_small():
    toy = kr.layers.CNF(kr.layers.ConcatSquashMLP(hidden=(4,)), trace="hutchinson")
    image = kr.layers.CNF(kr.layers.ConcatSquashConvNet(channels=(4,)), trace="hutchinson")
    assert toy.evaluation_trace((2,)) == "exact"
    assert image.evaluation_trace((8, 8, 1)) == "hutchinson"
    assert kr.layers.CNF(kr.layers.ConcatSquashMLP(hidden=(4,)), trace="exact",
                         ).evaluation_trace((784,)) == "exact"


def test_more_probes_shrink_the_standard_error():
    model, x = digits_model()
    model.build((None, 8, 8, 1))
    errors = {}
    for probes in (4, 16):
        model.set_evaluation(probes=probes)
        result = evaluate_model(model, x, batch_size=16, midpoint=False)
        assert result["trace"] == f"hutchinson x{probes}"
        errors[probes] = result["bpd_se"]
    # 1 / sqrt(K): a fourth as many probes, twice the error (loosely: few probes).
    assert 1.2 < errors[4] / errors[16] < 3.5, errors
    with pytest.raises(ValueError, match="eval_probes"):
        model.set_evaluation(probes=0)


def test_a_loaded_model_trains_on_without_compile(tmp_path):
    model, _ = trained_toy()
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    steps = int(np_(loaded.optimizer.iterations))
    assert steps == int(np_(model.optimizer.iterations)) > 0  # Adam's state came back
    history = loaded.fit(kr.datasets.toy("8gaussians", 256, seed=2), batch_size=128,
                         epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][-1])
    assert int(np_(loaded.optimizer.iterations)) == steps + 2
