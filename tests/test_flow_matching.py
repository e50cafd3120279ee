"""Flow matching (`keras_rnode.objectives`): the path, the loss, the OT coupling, training.

- For one data point x0 the path's velocity is (z_t - x0) / t whatever the
  base draw: a field equal to it has loss 0 (one block, and a chain of two
  that splits the path's time).
- The OT assignment equals brute force over all permutations.
- A 2-D flow trained by flow matching learns (held-out NLL far below its
  start), with either coupling; OT lowers the loss's spread and the NFE.
- A flow-matching model is an ordinary RNODE: log_prob, bits/dim, sample,
  penalties, save/load and the objective switch to likelihood.
- Conditional flows and images compose; what cannot be trained so is a
  clear error.

Runs under every Keras backend.
"""

import itertools

import keras
import numpy as np
import pytest
from keras import ops

import keras_rnode as kr
from keras_rnode import objectives
from keras_rnode.evaluation import log_prob_batches
from tests.backend_utils import BACKEND, np_

pytestmark = pytest.mark.backends

X0 = np.array([0.7, -1.2])


class TowardsX0(keras.layers.Layer):
    """f(t, z) = (z - x0) / (t + offset): the exact velocity of flow matching's path for
    the single data point x0 (offset: where the block's time starts on the path)."""

    def __init__(self, offset=0.0, **kwargs):
        super().__init__(dtype="float64", **kwargs)
        self.offset = offset

    def call(self, t, z):
        t = ops.reshape(ops.cast(t, z.dtype), (-1, 1)) + self.offset
        return (z - ops.convert_to_tensor(X0, z.dtype)) / t


def fm_model(blocks, **kwargs):
    return kr.RNODE(blocks, objective="flow_matching", dtype="float64", **kwargs)


@pytest.mark.parametrize("ends", [(1.0,), (0.5, 0.5), (0.3, 0.9)])
def test_a_field_equal_to_the_path_velocity_has_zero_loss(ends):
    offsets = np.cumsum((0.0,) + ends[:-1])
    blocks = [kr.layers.CNF(TowardsX0(offset), trace="exact", T=end, dtype="float64")
              for offset, end in zip(offsets, ends)]
    model = fm_model(blocks)
    x = np.tile(X0, (256, 1))
    loss = np_(model._flow_matching_loss(ops.convert_to_tensor(x, "float64"), None))
    assert loss.shape == (256,)
    np.testing.assert_allclose(loss, 0.0, atol=1e-18)
    # The same field against another data point is far from its velocity.
    far = np_(model._flow_matching_loss(ops.convert_to_tensor(x + 1.0, "float64"), None))
    assert far.mean() > 1.0


def test_the_straight_path_and_its_velocity():
    x, z = np.array([[1.0, 2.0]]), np.array([[-1.0, 0.0]])
    t, big_t = np.array([0.5]), 2.0
    z_t, u = (np_(v) for v in objectives.straight_path(
        ops.convert_to_tensor(x), ops.convert_to_tensor(z), ops.convert_to_tensor(t), big_t))
    np.testing.assert_allclose(z_t, 0.75 * x + 0.25 * z)  # s = t / T = 1/4
    np.testing.assert_allclose(u, (z - x) / big_t)


@pytest.mark.parametrize("n, dims, seed", [(5, 2, 0), (6, 3, 1), (7, 1, 2)])
def test_ot_assignment_equals_brute_force(n, dims, seed):
    rng = np.random.default_rng(seed)
    x, z = rng.normal(size=(n, dims)), rng.normal(size=(n, dims))

    def cost(perm):
        return float(np.sum((x - z[list(perm)]) ** 2))

    best = min(itertools.permutations(range(n)), key=cost)
    assignment = objectives.ot_assignment(x, z)
    assert sorted(assignment) == list(range(n))
    np.testing.assert_allclose(cost(assignment), cost(best), rtol=1e-12)
    assert cost(assignment) < cost(range(n))  # the identity pairing is not optimal here


def toy_model(objective, hidden=(32, 32), **kwargs):
    net = kr.layers.ConcatSquashMLP(hidden=hidden)
    cnf = kr.layers.CNF(net, trace="exact", eval_rtol=1e-4, eval_atol=1e-4, seed=0)
    return kr.RNODE([cnf], objective=objective, seed=0, **kwargs)


@pytest.fixture(scope="module")
def trained():
    """Two 2-D flows trained 250 steps by flow matching, one per coupling, with their
    held-out NLL before training and the logs."""
    x = kr.datasets.toy("8gaussians", 8192, seed=0)
    x_test = kr.datasets.toy("8gaussians", 500, seed=1)
    out = {}
    for coupling in objectives.COUPLINGS:
        keras.utils.set_random_seed(0)
        model = toy_model(objectives.FlowMatching(coupling=coupling))
        model.build((None, 2))
        before = float(-np.mean(log_prob_batches(model, x_test)[0]))
        model.compile(optimizer=keras.optimizers.Adam(3e-3),
                      jit_compile=BACKEND == "jax")
        history = model.fit(kr.datasets.make_dataset(x, 256, seed=0, repeat=True), epochs=1,
                            steps_per_epoch=250, verbose=0, shuffle=False).history
        out[coupling] = model, before, history
    return out, x_test


def test_flow_matching_learns_with_either_coupling(trained):
    runs, x_test = trained
    nll, nfe = {}, {}
    for coupling, (model, before, history) in runs.items():
        assert set(history) == {"loss", "flow_matching"}  # no solver figures
        log_p, nfe[coupling], status = log_prob_batches(model, x_test)
        nll[coupling] = float(-np.mean(log_p))
        assert status == "success"
        assert nll[coupling] < before - 1.0, (coupling, before, nll[coupling])
    # The OT pairing straightens the paths: far less regression spread, fewer steps.
    ot, independent = runs["ot"][2], runs["independent"][2]
    assert ot["flow_matching"][-1] < 0.5 * independent["flow_matching"][-1]
    assert nfe["ot"] <= nfe["independent"]


def test_a_flow_matching_model_is_an_ordinary_rnode(trained, tmp_path):
    runs, x_test = trained
    model = runs["ot"][0]
    log_p = np_(model.log_prob(x_test[:20]))
    assert np.all(np.isfinite(log_p))
    samples = np_(model.sample(50, seed=1))
    assert samples.shape == (50, 2) and np.all(np.isfinite(samples))
    kinetic = np_(model.penalties(x_test[:20], names=["kinetic"])["kinetic"])
    assert kinetic.shape == (20,) and np.all(kinetic > 0)
    path = str(tmp_path / "fm.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.objective == objectives.FlowMatching(coupling="ot")
    np.testing.assert_allclose(np_(loaded.log_prob(x_test[:20])), log_p, rtol=1e-5, atol=1e-5)


def test_switching_to_likelihood_fine_tunes_with_the_penalties(trained):
    runs, x_test = trained
    model = runs["independent"][0]
    model.objective = "likelihood"
    assert model.objective == objectives.Likelihood()
    x = kr.datasets.toy("8gaussians", 512, seed=2)
    # Not compiled for it: fit would train on with flow matching's optimizer state.
    with pytest.raises(ValueError, match="compiled for flow_matching: compile"):
        model.fit(x, batch_size=128, epochs=1, verbose=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=BACKEND == "jax")
    history = model.fit(x, batch_size=128, epochs=1, verbose=0).history
    assert {"nll", "kinetic", "jacobian", "nfe"} <= set(history)
    assert np.isfinite(history["loss"][-1]) and history["nfe"][-1] > 0


def test_the_objective_is_kept_by_the_config_and_settable_by_name():
    model = toy_model("flow-matching")
    assert model.objective == objectives.FlowMatching()
    clone = kr.RNODE.from_config(model.get_config())
    assert clone.objective == objectives.FlowMatching()
    model.objective = objectives.FlowMatching(coupling="ot", sigma=0.1)
    assert kr.RNODE.from_config(model.get_config()).objective.sigma == 0.1
    assert toy_model("likelihood").get_config()["objective"] == {"name": "likelihood"}


@pytest.mark.parametrize("make, match", [
    (lambda: objectives.get("score_matching"), "objective must be one of"),
    (lambda: objectives.FlowMatching(coupling="sinkhorn"), "coupling must be one of"),
    (lambda: objectives.FlowMatching(sigma=-1.0), "sigma must be"),
    (lambda: kr.multiscale_rnode((4, 4, 1), channels=(4,), blocks_per_scale=1, n_scales=2,
                                 levels=17).__setattr__("objective", "flow_matching"),
     "MultiscaleRNODE squeezes"),
    (lambda: kr.multiscale_rnode((4, 4, 1), channels=(4,), blocks_per_scale=1, n_scales=2,
                                 levels=17, objective="flow_matching"),
     "MultiscaleRNODE squeezes"),
    (lambda: kr.RNODE([kr.layers.CNF(kr.layers.ConcatSquashMLP(hidden=(4,)), train_T=True)],
                      objective="flow_matching"), "train_T"),
    (lambda: kr.RNODE([kr.layers.CNF(kr.layers.ConcatSquashMLP(hidden=(4,), context_dim=2))],
                      objective=objectives.FlowMatching(coupling="ot")), "conditional flow"),
])
def test_what_flow_matching_cannot_train_is_a_clear_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_conditional_flow_matching_fits_on_pairs():
    keras.utils.set_random_seed(1)
    x, label = kr.datasets.toy("8gaussians", 2048, seed=0, labels=True)
    c = np.eye(8, dtype="float32")[label]
    net = kr.layers.ConcatSquashMLP(hidden=(32, 32), context_dim=8)
    model = kr.RNODE([kr.layers.CNF(net, trace="exact", eval_rtol=1e-4, eval_atol=1e-4)],
                     objective="flow_matching")
    model.compile(optimizer=keras.optimizers.Adam(5e-3), jit_compile=BACKEND == "jax")
    history = model.fit(x, c, batch_size=256, epochs=8, verbose=0).history
    assert history["flow_matching"][-1] < history["flow_matching"][0]
    # Each label's points are likelier under their own label than under another.
    own = np_(model.log_prob(x[:64], c[:64]))
    other = np_(model.log_prob(x[:64], np.roll(c[:64], 4, axis=1)))
    assert np.mean(own) > np.mean(other) + 1.0


def test_images_train_in_the_logit_space_and_report_bits_per_dim():
    keras.utils.set_random_seed(2)
    images = np.random.default_rng(0).integers(0, 5, (256, 3, 3, 1)).astype("float32")
    net = kr.layers.ConcatSquashConvNet(channels=(8,))
    model = kr.RNODE([kr.layers.CNF(net, trace="exact", method="rk4", step_size=0.25)],
                     levels=5, logit_alpha=0.05, objective=objectives.FlowMatching(sigma=0.01))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=BACKEND == "jax")
    history = model.fit(images, batch_size=64, epochs=2, verbose=0).history
    assert np.all(np.isfinite(history["flow_matching"]))
    bpd = np_(model.bits_per_dim(images[:8]))
    assert bpd.shape == (8,) and np.all(np.isfinite(bpd)) and np.all(bpd > 0)
