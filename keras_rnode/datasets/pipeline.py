"""A tf.data input pipeline for unlabelled arrays: cache, seeded shuffle, batch, prefetch."""

import numpy as np
import tensorflow as tf

from keras_rnode import checks


def make_dataset(
    x, batch_size, shuffle=True, seed=0, repeat=False, drop_remainder=True, cache=True
):
    """Batches of x as a tf.data.Dataset.

    With drop_remainder every batch has the same static shape, which keeps
    a jit-compiled train step from retracing on the last, smaller batch.
    Shuffling uses `seed` and reshuffles each pass, so two datasets built
    with the same seed yield the same sequence of epochs.
    """
    if not isinstance(x, np.ndarray):
        raise ValueError(f"x must be a numpy array, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"x must have rank >= 2 (samples, *event), got shape {x.shape}")
    batch_size = checks.integer(batch_size, "batch_size")
    if drop_remainder and batch_size > len(x):
        raise ValueError(
            f"batch_size {batch_size} exceeds the {len(x)} samples; with "
            "drop_remainder=True no batch would be produced"
        )
    checks.check_finite(x, "x")

    ds = tf.data.Dataset.from_tensor_slices(x)
    # Cache before shuffling: the cached pass is reused, the order is not.
    if cache:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)
