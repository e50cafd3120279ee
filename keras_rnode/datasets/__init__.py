"""Data: FFJORD's 2-D toy distributions, scikit-learn digits, MNIST, CIFAR-10, tf.data."""

from keras_rnode.datasets.images import (
    CIFAR10_LEVELS,
    DIGITS_LEVELS,
    MNIST_LEVELS,
    cifar10,
    digits,
    mnist,
)
from keras_rnode.datasets.pipeline import make_dataset
from keras_rnode.datasets.toy import TOY_NAMES, toy, toy_entropy

__all__ = [
    "CIFAR10_LEVELS",
    "DIGITS_LEVELS",
    "MNIST_LEVELS",
    "TOY_NAMES",
    "cifar10",
    "digits",
    "make_dataset",
    "mnist",
    "toy",
    "toy_entropy",
]
