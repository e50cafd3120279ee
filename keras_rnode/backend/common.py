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
