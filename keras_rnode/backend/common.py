"""Shared defaults: the hooks that more than one backend defines the same way.

A backend module imports the ones it uses from here and defines its own
where it must differ (the PyTorch `matmul`, the TensorFlow
`recorder_read`), so a reader finds each definition once.
"""

from keras import ops


def matmul(x1, x2):
    """x1 @ x2: Keras's own, which keeps float64 on TensorFlow and JAX."""
    return ops.matmul(x1, x2)


def recorder_read(recorder, index):
    """The tensors written at `index`, one per recorded tensor (array recorders)."""
    return [r[index] for r in recorder]


def import_tensorflow(feature):
    """TensorFlow, for a `feature` only it provides (a SavedModel, tf.distribute).

    Under JAX or PyTorch the package runs without TensorFlow installed (the
    GPU machines this project borrows have none); there such a feature
    raises ImportError naming itself and what to do, instead of a bare
    "No module named 'tensorflow'" from deep inside.
    """
    try:
        import tensorflow as tf
    except ModuleNotFoundError as err:
        if err.name != "tensorflow":
            raise
        import keras

        raise ImportError(
            f"{feature} needs TensorFlow, which is not installed here (Keras runs on "
            f"{keras.backend.backend()!r}): pip install tensorflow, or do this step in a "
            "process that has it (a model's .keras file loads on every backend)") from err
    return tf
