"""Toy distributions, image loaders and the tf.data pipeline."""

import math

import keras
import numpy as np
import pytest
from scipy.special import logsumexp

from keras_rnode.datasets import images
from keras_rnode.datasets.pipeline import make_dataset
from keras_rnode.datasets.toys import TOY_CLASSES, TOY_NAMES, toy, toy_entropy

# ---------------------------------------------------------------- toy data


def test_toy_names():
    assert set(TOY_NAMES) == {
        "8gaussians", "pinwheel", "checkerboard", "2spirals",
        "moons", "rings", "swissroll", "circles",
    }


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_shape_dtype_and_seeding(name):
    a = toy(name, 501, seed=3)
    assert a.shape == (501, 2) and a.dtype == np.float32
    assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, toy(name, 501, seed=3))
    assert not np.array_equal(a, toy(name, 501, seed=4))
    # FFJORD's toys all live in roughly [-4, 4]^2; a wrong scale shows here.
    assert 1.0 < np.abs(a).max() < 6.0


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_single_sample(name):
    assert toy(name, 1).shape == (1, 2)


def test_toy_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="checkerboard") as info:
        toy("banana", 10)
    assert all(n in str(info.value) for n in TOY_NAMES)
    with pytest.raises(ValueError, match="pinwheel"):
        toy_entropy("banana")


@pytest.mark.parametrize("n", [0, -5, 2.5, True])
def test_toy_bad_n(n):
    with pytest.raises(ValueError, match="n must be"):
        toy("moons", n)


def test_checkerboard_samples_lie_in_black_squares_uniformly():
    a = toy("checkerboard", 40000, seed=0).astype(np.float64)
    assert np.all((a >= -4) & (a < 4))
    col, row = np.floor(a[:, 0] / 2), np.floor(a[:, 1] / 2)
    assert np.all((col + row) % 2 == 0)
    # All 8 squares of side 2 get about an eighth each.
    _, counts = np.unique(np.stack([col, row], 1), axis=0, return_counts=True)
    assert len(counts) == 8
    np.testing.assert_allclose(counts / len(a), 1 / 8, atol=0.01)


def _eight_gaussians_log_density(x):
    angles = np.arange(8) * np.pi / 4
    centres = 4.0 / 1.414 * np.stack([np.cos(angles), np.sin(angles)], 1)
    var = (0.5 / 1.414) ** 2
    d2 = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
    return logsumexp(-d2 / (2 * var), axis=1) - math.log(8 * 2 * math.pi * var)


def test_eight_gaussians_entropy_by_quadrature():
    h_quoted = toy_entropy("8gaussians")
    assert h_quoted == pytest.approx(2.83188, abs=1e-5)
    # Trapezoid quadrature of -p log p over a box 10 sigma past the centres:
    # independent of the stored figure and of the sampler.
    g = np.linspace(-6.5, 6.5, 801)
    xx, yy = np.meshgrid(g, g)
    lp = _eight_gaussians_log_density(np.stack([xx.ravel(), yy.ravel()], 1))
    cell = (g[1] - g[0]) ** 2
    assert np.exp(lp).sum() * cell == pytest.approx(1.0, abs=1e-9)
    assert -(np.exp(lp) * lp).sum() * cell == pytest.approx(h_quoted, abs=1e-6)
    # The mixture is not quite separated: below log 8 + a Gaussian's entropy.
    separated = math.log(8) + math.log(2 * math.pi * math.e * (0.5 / 1.414) ** 2)
    assert 0.003 < separated - h_quoted < 0.01


def test_eight_gaussians_sampler_matches_the_mixture_entropy():
    # Monte Carlo -E[log p] over the generator's own samples: checks that
    # toy() draws from the mixture whose entropy is quoted.
    x = toy("8gaussians", 200_000, seed=1).astype(np.float64)
    nll = -_eight_gaussians_log_density(x)
    stderr = nll.std() / math.sqrt(len(x))
    assert abs(nll.mean() - toy_entropy("8gaussians")) < 4 * stderr
    assert stderr < 3e-3


def test_toy_entropy_known_and_unknown():
    assert toy_entropy("checkerboard") == pytest.approx(math.log(32.0), abs=1e-12)
    assert toy_entropy("checkerboard") == pytest.approx(3.4657, abs=1e-4)
    for name in set(TOY_NAMES) - {"checkerboard", "8gaussians"}:
        assert toy_entropy(name) is None


# ---------------------------------------------------------------- images


def test_digits_shapes_levels_and_fixed_split():
    (x_tr, y_tr), (x_te, y_te) = images.digits()
    assert x_tr.shape == (1437, 8, 8, 1) and x_te.shape == (360, 8, 8, 1)
    assert x_tr.dtype == np.uint8 and y_tr.dtype == np.int64
    assert images.DIGITS_LEVELS == 17
    assert x_tr.min() == 0 and x_tr.max() == images.DIGITS_LEVELS - 1
    assert set(np.unique(y_tr)) == set(range(10))
    # Stratified: every class keeps about 20% of its images in the test set.
    frac = np.bincount(y_te, minlength=10) / (
        np.bincount(y_tr, minlength=10) + np.bincount(y_te, minlength=10)
    )
    np.testing.assert_allclose(frac, 0.2, atol=0.02)
    (x_tr2, y_tr2), (x_te2, _) = images.digits()
    np.testing.assert_array_equal(x_tr, x_tr2)
    np.testing.assert_array_equal(y_tr, y_tr2)
    np.testing.assert_array_equal(x_te, x_te2)


def _fake(shape_x, shape_y, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=shape_x).astype(np.uint8)
    y = rng.integers(0, 10, size=shape_y).astype(np.uint8)
    return x, y


def test_mnist_adds_channel_axis(monkeypatch):
    train, test = _fake((5, 28, 28), (5,), 0), _fake((3, 28, 28), (3,), 1)
    monkeypatch.setattr(keras.datasets.mnist, "load_data", lambda: (train, test))
    (x_tr, y_tr), (x_te, y_te) = images.mnist()
    assert x_tr.shape == (5, 28, 28, 1) and x_te.shape == (3, 28, 28, 1)
    assert x_tr.dtype == np.uint8 and y_tr.dtype == np.int64 and y_te.shape == (3,)
    np.testing.assert_array_equal(x_tr[..., 0], train[0])
    np.testing.assert_array_equal(y_tr, train[1])
    assert images.MNIST_LEVELS == 256


@pytest.mark.parametrize("channels_first", [False, True])
def test_cifar10_is_nhwc_with_flat_labels(monkeypatch, channels_first):
    nhwc, y = _fake((4, 32, 32, 3), (4, 1), 2)
    raw = np.transpose(nhwc, (0, 3, 1, 2)) if channels_first else nhwc
    monkeypatch.setattr(
        keras.datasets.cifar10, "load_data", lambda: ((raw, y), (raw[:2], y[:2]))
    )
    (x_tr, y_tr), (x_te, y_te) = images.cifar10()
    assert x_tr.shape == (4, 32, 32, 3) and x_te.shape == (2, 32, 32, 3)
    assert x_tr.dtype == np.uint8 and y_tr.shape == (4,) and y_tr.dtype == np.int64
    np.testing.assert_array_equal(x_tr, nhwc)
    np.testing.assert_array_equal(y_te, y[:2, 0])
    assert images.CIFAR10_LEVELS == 256


# ---------------------------------------------------------------- pipeline


def _epochs(ds, n):
    it = iter(ds)
    return [np.concatenate([next(it).numpy() for _ in range(n)]) for _ in range(2)]


def test_pipeline_fixed_batch_shapes():
    x = np.arange(23 * 3, dtype=np.float32).reshape(23, 3)
    batches = [b.numpy() for b in make_dataset(x, 5)]
    assert len(batches) == 4 and all(b.shape == (5, 3) for b in batches)
    ds = make_dataset(x, 5)
    assert ds.element_spec.shape.as_list() == [5, 3]
    last = [b.numpy() for b in make_dataset(x, 5, drop_remainder=False)][-1]
    assert last.shape == (3, 3)


def test_pipeline_unshuffled_keeps_order():
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    out = np.concatenate([b.numpy() for b in make_dataset(x, 2, shuffle=False)])
    np.testing.assert_array_equal(out, x)


def test_pipeline_shuffle_is_seeded_and_reshuffles():
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    a = _epochs(make_dataset(x, 4, seed=7, repeat=True), 5)
    b = _epochs(make_dataset(x, 4, seed=7, repeat=True), 5)
    c = _epochs(make_dataset(x, 4, seed=8, repeat=True), 5)
    for ea, eb in zip(a, b):
        np.testing.assert_array_equal(ea, eb)
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[0], a[1])  # a new order each pass
    for epoch in a:  # each pass is a permutation of the rows
        np.testing.assert_array_equal(np.sort(epoch[:, 0]), x[:, 0])
    # Without repeat, iterating the dataset again also reshuffles.
    ds = make_dataset(x, 4, seed=7)
    first, second = ([b.numpy() for b in ds] for _ in range(2))
    assert not np.array_equal(np.concatenate(first), np.concatenate(second))


def test_pipeline_integer_images():
    x = np.random.default_rng(0).integers(0, 17, (10, 8, 8, 1)).astype(np.uint8)
    b = next(iter(make_dataset(x, 4)))
    assert b.dtype == "uint8" and b.shape == (4, 8, 8, 1)


def test_pipeline_rejects_non_finite():
    x = np.zeros((10, 2, 2), np.float32)
    x[3, 1, 0] = np.nan
    x[7, 0, 0] = np.inf
    x[7, 0, 1] = -np.inf
    with pytest.raises(ValueError, match=r"3 non-finite.*first in row 3"):
        make_dataset(x, 2)


@pytest.mark.parametrize(
    "x, batch_size, kwargs, match",
    [
        ([[1.0, 2.0]], 1, {}, "numpy array"),
        (np.zeros(5, np.float32), 1, {}, "rank >= 2"),
        (np.zeros((5, 2), np.float32), 0, {}, ">= 1"),
        (np.zeros((5, 2), np.float32), 2.0, {}, "integer"),
        (np.zeros((5, 2), np.float32), 6, {}, "exceeds"),
    ],
)
def test_pipeline_validation(x, batch_size, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_dataset(x, batch_size, **kwargs)


def test_pipeline_big_batch_allowed_without_drop_remainder():
    x = np.ones((5, 2), np.float32)
    (b,) = list(make_dataset(x, 6, drop_remainder=False))
    assert b.shape == (5, 2)


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_labels_name_each_points_component(name):
    x, labels = toy(name, 4000, seed=5, labels=True)
    np.testing.assert_array_equal(x, toy(name, 4000, seed=5))  # the same points
    assert labels.dtype == np.int64 and labels.shape == (4000,)
    # Every component is drawn, and only those.
    assert set(np.unique(labels)) == set(range(TOY_CLASSES[name]))


def test_eight_gaussians_labels_are_the_nearest_centre():
    x, labels = toy("8gaussians", 4000, seed=6, labels=True)
    angles = np.arange(8) * np.pi / 4
    centres = 4.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1) / 1.414
    nearest = np.argmin(((x[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    assert np.mean(nearest == labels) > 0.99
