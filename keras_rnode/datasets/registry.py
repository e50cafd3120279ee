"""Data sets by name, as `rnode train --dataset` takes them: a toy, an image set or a .npy file."""

import os

import numpy as np

from keras_rnode import checks
from keras_rnode.datasets import images
from keras_rnode.datasets.toys import TOY_NAMES, toy

# name -> (loader, grey levels)
_IMAGE_SETS = {
    "digits": (images.digits, images.DIGITS_LEVELS),
    "mnist": (images.mnist, images.MNIST_LEVELS),
    "cifar10": (images.cifar10, images.CIFAR10_LEVELS),
}
IMAGE_DATASETS = tuple(_IMAGE_SETS)
# `rnode train --n-train`'s default (TrainSettings.n_train): the README's figures use it.
TOY_TRAIN_SIZE = 100000
TOY_TEST_SIZE = 5000


def check_dataset(name):
    """A toy name, an image data set, or a path to a .npy file; ValueError otherwise."""
    if name in TOY_NAMES or name in IMAGE_DATASETS:
        return name
    if str(name).endswith(".npy"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"data file {name} does not exist")
        return name
    raise ValueError(f"unknown dataset {name!r}; choose one of "
                     f"{', '.join(TOY_NAMES + IMAGE_DATASETS)}, or give a .npy file")


def is_image_dataset(name):
    return name in IMAGE_DATASETS


def dataset_name(dataset):
    """The name a person reads: a .npy file by its base name."""
    return os.path.basename(dataset) if dataset.endswith(".npy") else dataset


def load_npy(path):
    """A .npy file of continuous data (n >= 2, *event_shape) as float32, all finite."""
    x = np.load(path, allow_pickle=False)
    if not np.issubdtype(x.dtype, np.number) or x.ndim < 2 or len(x) < 2:
        raise ValueError(f"{path}: need a numeric array of shape (n >= 2, *event_shape), "
                         f"got dtype {x.dtype} and shape {x.shape}")
    x = x.astype(np.float32)
    checks.check_finite(x, path)
    return x


def load_data(dataset, split, n=None, seed=0):
    """The train or test split of a data set: (x, levels).

    Toy data: `n` fresh points drawn with `seed` (train) or `seed + 1`
    (test). Images: integer arrays with `levels` grey levels, the first `n`
    if n is given. A .npy file (continuous data): the last tenth is the
    test split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    dataset = check_dataset(dataset)
    if dataset in TOY_NAMES:
        n = n or (TOY_TRAIN_SIZE if split == "train" else TOY_TEST_SIZE)
        return toy(dataset, int(n), seed=seed + (split == "test")), None
    if is_image_dataset(dataset):
        loader, levels = _IMAGE_SETS[dataset]
        (x_train, _), (x_test, _) = loader()
        x = x_train if split == "train" else x_test
        return (x[:n] if n else x), levels
    x = load_npy(dataset)
    cut = len(x) - max(1, len(x) // 10)
    x = x[:cut] if split == "train" else x[cut:]
    return (x[:n] if n else x), None
