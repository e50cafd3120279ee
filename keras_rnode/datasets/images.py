"""Image data sets as integer NHWC arrays: scikit-learn digits, MNIST, CIFAR-10.

Every loader returns ((x_train, y_train), (x_test, y_test)) with x uint8
of shape (n, height, width, channels) holding grey levels 0..LEVELS-1,
and y int64 of shape (n,). Scaling to [0, 1) is the Dequantize layer's job,
so that bits/dim can be computed against the right number of levels.
"""

import numpy as np

# keras is imported when used, so that the command line's help loads without it.

DIGITS_LEVELS = 17  # scikit-learn's digits count 0..16 pixels per 4x4 block
MNIST_LEVELS = 256
CIFAR10_LEVELS = 256


def digits():
    """scikit-learn's 8x8 digits: (n, 8, 8, 1) uint8 in 0..16, fixed 80/20 split.

    The split is stratified by label with random_state=0, so it is the same
    on every machine: 1437 training and 360 test images.
    """
    # Imported here so that importing the package does not pull in sklearn.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.images.astype(np.uint8)[..., None]
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y
    )
    return (x_train, y_train), (x_test, y_test)


def _to_nhwc(x, channels):
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    # keras.datasets follows keras.config.image_data_format(); we always want NHWC.
    if x.shape[-1] != channels and x.shape[1] == channels:
        x = np.transpose(x, (0, 2, 3, 1))
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(f"Expected images with {channels} channel(s), got shape {x.shape}")
    return x.astype(np.uint8, copy=False)


def _labels(y):
    return np.asarray(y).reshape(-1).astype(np.int64)


def _load(loader, channels):
    (x_train, y_train), (x_test, y_test) = loader()
    return (
        (_to_nhwc(x_train, channels), _labels(y_train)),
        (_to_nhwc(x_test, channels), _labels(y_test)),
    )


def mnist():
    """MNIST via keras.datasets (downloaded once, then cached): (n, 28, 28, 1) uint8."""
    import keras

    # Looked up at call time so that tests can stand in for the download.
    return _load(keras.datasets.mnist.load_data, channels=1)


def cifar10():
    """CIFAR-10 via keras.datasets (downloaded once, then cached): (n, 32, 32, 3) uint8."""
    import keras

    return _load(keras.datasets.cifar10.load_data, channels=3)
