"""Data: FFJORD's 2-D toy distributions, scikit-learn digits, MNIST, CIFAR-10, tf.data,
and the lookup of a data set by name (`load_data`)."""

from keras_rnode.lazy import lazy_package

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

# Each name is imported when first read (keras_rnode.lazy): the names of the
# data sets load without keras, the tf.data pipeline with TensorFlow.
lazy_package(__name__, {
    **{name: "keras_rnode.datasets.images" for name in ("CIFAR10_LEVELS", "DIGITS_LEVELS",
                                                        "MNIST_LEVELS", "cifar10", "digits",
                                                        "mnist")},
    "make_dataset": "keras_rnode.datasets.pipeline",
    **{name: "keras_rnode.datasets.registry" for name in ("IMAGE_DATASETS", "TOY_TEST_SIZE",
                                                          "check_dataset", "dataset_name",
                                                          "is_image_dataset", "load_data",
                                                          "load_npy")},
    **{name: "keras_rnode.datasets.toy" for name in ("TOY_CLASSES", "TOY_NAMES", "toy",
                                                     "toy_entropy")},
})
