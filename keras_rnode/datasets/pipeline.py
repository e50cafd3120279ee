"""The input pipeline for unlabelled arrays: tf.data on TensorFlow, a PyDataset elsewhere."""

import keras
import numpy as np

from keras_rnode import checks


def make_dataset(
    x, batch_size, shuffle=True, seed=0, repeat=False, drop_remainder=True, cache=True, start=0
):
    """Batches of x, from batch `start` of the stream on.

    On the TensorFlow backend a tf.data.Dataset (cached, shuffled,
    batched, prefetched); on JAX and PyTorch a `batches.ArrayBatches`
    (keras.utils.PyDataset), which needs no TensorFlow. With
    drop_remainder every batch has the same static shape, which keeps a
    jit-compiled train step from retracing on the last, smaller batch.
    Shuffling uses `seed` and reshuffles each pass, so two datasets built
    with the same seed yield the same sequence of epochs (the two backends'
    sequences differ). Raises ValueError for a non-array, NaN or inf in x,
    or a batch larger than x with drop_remainder.
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
    start = checks.integer(start, "start", minimum=0)
    if keras.backend.backend() != "tensorflow":
        from keras_rnode.datasets.batches import ArrayBatches

        return ArrayBatches(x, batch_size, shuffle, seed, repeat, drop_remainder, start)
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(x)
    # Cache before shuffling: the cached pass is reused, the order is not.
    if cache:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder).skip(start)
    return ds.prefetch(tf.data.AUTOTUNE)
