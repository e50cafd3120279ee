"""A tf.data input pipeline for unlabelled arrays: cache, seeded shuffle, batch, prefetch."""

import numpy as np
import tensorflow as tf


def _check_finite(x):
    if not np.issubdtype(x.dtype, np.floating):
        return
    bad = ~np.isfinite(x)
    count = int(bad.sum())
    if count:
        first_row = int(np.argmax(bad.reshape(len(x), -1).any(axis=1)))
        raise ValueError(
            f"x has {count} non-finite value(s) (NaN or inf); first bad row: {first_row}"
        )


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
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise ValueError(f"batch_size must be an integer, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if drop_remainder and batch_size > len(x):
        raise ValueError(
            f"batch_size {batch_size} exceeds the {len(x)} samples; with "
            "drop_remainder=True no batch would be produced"
        )
    _check_finite(x)

    ds = tf.data.Dataset.from_tensor_slices(x)
    # Cache before shuffling: the cached pass is reused, the order is not.
    if cache:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)
