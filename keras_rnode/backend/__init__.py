"""The one place that knows which Keras backend runs.

Everything backend-specific that the solver needs sits behind these
names: a solve whose gradient we define ourselves, a vector-Jacobian
product with respect to states and variables, and the recorder that keeps
the accepted steps for the direct gradient.
"""

import keras

NAME = keras.backend.backend()

if NAME == "tensorflow":
    from keras_rnode.backend.tensorflow import (
        differentiable_solve,
        jacobian_product,
        recorder_new,
        recorder_read,
        recorder_write,
        vjp,
    )
else:  # pragma: no cover - the JAX and PyTorch backends are issue 6
    raise ImportError(
        f"keras-rnode runs on the TensorFlow backend for now; KERAS_BACKEND={NAME!r} "
        "is not supported yet. Set KERAS_BACKEND=tensorflow."
    )

__all__ = [
    "NAME",
    "differentiable_solve",
    "jacobian_product",
    "recorder_new",
    "recorder_read",
    "recorder_write",
    "vjp",
]
