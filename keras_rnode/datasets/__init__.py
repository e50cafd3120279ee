"""Data: FFJORD's 2-D toy distributions, scikit-learn digits, MNIST, CIFAR-10, tf.data,
and the lookup of a data set by name (`load_data`)."""

from typing import TYPE_CHECKING

from keras_rnode import lazy

# What tools read; at run time each name is imported when first read
# (keras_rnode.lazy): the names of the data sets load without keras, the
# tf.data pipeline with TensorFlow.
if TYPE_CHECKING:
    from keras_rnode.datasets.images import (CIFAR10_LEVELS, DIGITS_LEVELS, MNIST_LEVELS,
                                             cifar10, digits, mnist)
    from keras_rnode.datasets.pipeline import make_dataset
    from keras_rnode.datasets.registry import (IMAGE_DATASETS, TOY_TEST_SIZE, check_dataset,
                                               dataset_name, is_image_dataset, load_data,
                                               load_npy)
    from keras_rnode.datasets.toys import TOY_CLASSES, TOY_NAMES, toy, toy_entropy

__all__ = [
    "CIFAR10_LEVELS",
    "DIGITS_LEVELS",
    "IMAGE_DATASETS",
    "MNIST_LEVELS",
    "TOY_CLASSES",
    "TOY_NAMES",
    "TOY_TEST_SIZE",
    "check_dataset",
    "cifar10",
    "dataset_name",
    "digits",
    "is_image_dataset",
    "load_data",
    "load_npy",
    "make_dataset",
    "mnist",
    "toy",
    "toy_entropy",
]
__getattr__, __dir__ = lazy.attach(__name__)
