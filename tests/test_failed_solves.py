"""Never a quietly wrong number: non-finite input and failed solves (issue 26, items 1-2).

- Eager code raises: a NaN row in a tensor names its row (as a NumPy array
  always did); a solve that stops short of its end raises SolveFailed naming
  the status. strict=False gives NaN instead.
- Compiled code (tf.function, jax.jit, predict, the SavedModel) cannot
  raise: a non-finite row is NaN and its batch-mates are exactly what they
  are without it; a failed solve makes the whole batch NaN.
- Under a mixed precision policy the solve stays float32: log p within 1e-2
  nats of float32 from the same weights, float32 samples, a working fit.

Runs under every Keras backend (compiled paths where the backend compiles).
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_rnode as kr
from keras_rnode.models.rnode import SolveFailed
from tests.backend_utils import BACKEND, np_, tf_only

pytestmark = pytest.mark.backends

X = kr.datasets.toy("8gaussians", 10, seed=0)


def toy_model(**solver):
    keras.utils.set_random_seed(0)
    net = kr.layers.ConcatSquashMLP(hidden=(16, 16), zero_init_last=False)
    cnf = kr.layers.CNF(net, trace="exact", seed=0, **solver)
    model = kr.RNODE([cnf])
    model.build((None, 2))
    return model


def with_nan_row(row=3):
    x = X.copy()
    x[row, 0] = np.nan
    return x


def compiled(model, fn):
    """fn compiled as the backend compiles inference (a tf.function, jax.jit)."""
    return kr.backend.inference_function(model, fn)


def test_a_nan_row_in_a_tensor_names_its_row():
    model = toy_model()
    for method in (model.log_prob, lambda v: model.penalties(v, names=["kinetic"])):
        with pytest.raises(ValueError, match="row 3"):
            method(ops.convert_to_tensor(with_nan_row()))
        with pytest.raises(ValueError, match="row 3"):
            method(with_nan_row())


@pytest.mark.skipif(BACKEND == "torch", reason="PyTorch runs eagerly: it raises")
def test_compiled_a_nan_row_is_nan_and_its_batch_mates_are_untouched():
    model = toy_model()
    clean = np_(model.log_prob(X))
    out = np_(compiled(model, lambda v: model.log_prob(v))(with_nan_row()))
    assert np.isnan(out[3]) and np.sum(np.isnan(out)) == 1
    np.testing.assert_allclose(np.delete(out, 3), np.delete(clean, 3), rtol=1e-6, atol=1e-6)


def tight_model():
    """dopri5 at 1e-6 with room for one step: every evaluation solve stops short."""
    return toy_model(eval_rtol=1e-6, eval_atol=1e-6, max_steps=1)


def test_a_failed_solve_raises_in_eager_code_and_is_nan_when_not_strict():
    model = tight_model()
    with pytest.raises(SolveFailed, match="status max_steps_reached"):
        model.log_prob(X)
    with pytest.raises(SolveFailed, match="sampling solve"):
        model.sample(4)
    assert np.all(np.isnan(np_(model.log_prob(X, strict=False))))


@pytest.mark.skipif(BACKEND == "torch", reason="PyTorch runs eagerly: it raises")
def test_compiled_a_failed_solve_is_nan_for_the_whole_batch():
    model = tight_model()
    assert np.all(np.isnan(np_(compiled(model, lambda v: model.log_prob(v))(X))))
    assert np.all(np.isnan(np_(model.predict(X, verbose=0))))


def test_predict_gives_nan_for_a_nan_row_or_raises_eagerly():
    model = toy_model()
    if BACKEND == "torch":  # predict runs eagerly: the row is named
        with pytest.raises(ValueError, match="row 3"):
            model.predict(with_nan_row(), verbose=0)
        return
    clean = np_(model.log_prob(X))
    out = model.predict(with_nan_row(), verbose=0)
    assert np.isnan(out[3])
    np.testing.assert_allclose(np.delete(out, 3), np.delete(clean, 3), rtol=1e-5, atol=1e-5)


@tf_only
def test_the_tfp_face_raises_eagerly_and_gives_nan_in_a_graph():
    import tensorflow as tf

    model = toy_model()
    dist = model.as_distribution()
    with pytest.raises(ValueError, match="row 3"):
        dist.log_prob(tf.constant(with_nan_row()))
    out = tf.function(dist.log_prob)(tf.constant(with_nan_row())).numpy()
    np.testing.assert_allclose(np.delete(out, 3), np.delete(np_(model.log_prob(X)), 3),
                               rtol=1e-5, atol=1e-5)
    assert np.isnan(out[3])


@tf_only
def test_the_saved_model_gives_nan_rows(tmp_path):
    import tensorflow as tf

    model = toy_model()
    loaded = tf.saved_model.load(model.export(str(tmp_path / "sm")))
    out = loaded.log_prob(tf.constant(with_nan_row())).numpy()
    assert np.isnan(out[3])
    np.testing.assert_allclose(np.delete(out, 3), np.delete(np_(model.log_prob(X)), 3),
                               rtol=1e-5, atol=1e-5)
    failed = tf.saved_model.load(tight_model().export(str(tmp_path / "tight")))
    assert np.all(np.isnan(failed.log_prob(tf.constant(X)).numpy()))


@pytest.fixture
def policy():
    yield keras.mixed_precision.set_dtype_policy
    keras.mixed_precision.set_dtype_policy("float32")


@pytest.mark.parametrize("name", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_solves_in_float32(policy, name):
    reference = toy_model()
    weights = reference.get_weights()
    expected = np_(reference.log_prob(X))
    policy(name)
    model = toy_model()
    model.set_weights(weights)
    assert model.blocks[0].dynamics.compute_dtype == name.split("_")[1]  # the net computes low
    log_p = model.log_prob(X)
    assert keras.backend.standardize_dtype(log_p.dtype) == "float32"
    error = np.abs(np_(log_p) - expected)
    if name == "mixed_float16":
        assert error.max() < 1e-2, error
    else:
        # bfloat16 keeps 8 bits of mantissa: the dynamics' own rounding (which no
        # float32 step control can see) leaves single points up to ~0.02 nats off.
        assert error.mean() < 1e-2 and error.max() < 5e-2, error
    assert int(np_(model.blocks[0].stats["status"])) == kr.Status.SUCCESS
    samples = model.sample(8, seed=1)
    assert keras.backend.standardize_dtype(samples.dtype) == "float32"
    assert np.all(np.isfinite(np_(samples))) and np.std(np_(samples)) > 0.1
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=BACKEND == "jax")
    history = model.fit(kr.datasets.toy("8gaussians", 256, seed=2), batch_size=128, epochs=1,
                        verbose=0).history
    assert history["kinetic"][-1] > 0 and history["nfe"][-1] < 200
