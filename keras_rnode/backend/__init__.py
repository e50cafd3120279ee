"""The one place that knows which Keras backend runs.

Everything backend-specific that the solver needs sits behind these
names, each defined by every backend module (tensorflow.py, jax.py,
torch.py), or taken by it from the shared defaults (common.py): a solve
whose gradient we define ourselves, a vector-Jacobian product with
respect to states and parameters, the Jacobian product of the Hutchinson
estimator, the recorder that keeps the accepted steps for the direct
gradient, a compiled inference function, a dtype-keeping matmul, a
tensor's value where it is known while tracing, and the SavedModel
endpoints an export can write.

The imports are spelled out per backend, as Keras does it, so a reader
or an editor can follow each name to its definition.
"""

import keras

NAME = keras.backend.backend()

if NAME == "tensorflow":
    from keras_rnode.backend.tensorflow import (
        differentiable_solve,
        inference_function,
        jacobian_product,
        matmul,
        recorder_new,
        recorder_read,
        recorder_write,
        saved_model_endpoints,
        static_value,
        vjp,
    )
elif NAME == "jax":
    from keras_rnode.backend.jax import (
        differentiable_solve,
        inference_function,
        jacobian_product,
        matmul,
        recorder_new,
        recorder_read,
        recorder_write,
        saved_model_endpoints,
        static_value,
        vjp,
    )
elif NAME == "torch":
    from keras_rnode.backend.torch import (
        differentiable_solve,
        inference_function,
        jacobian_product,
        matmul,
        recorder_new,
        recorder_read,
        recorder_write,
        saved_model_endpoints,
        static_value,
        vjp,
    )
else:
    raise ImportError(
        f"keras-rnode runs on the tensorflow, jax and torch Keras backends; "
        f"KERAS_BACKEND={NAME!r} is not supported.")

# A custom JAX gradient is a pure function: it cannot report the backward
# solve's statistics (CNF.stats["backward_nfe"] stays 0 there).
REPORTS_BACKWARD = NAME != "jax"

__all__ = [
    "NAME",
    "REPORTS_BACKWARD",
    "differentiable_solve",
    "inference_function",
    "jacobian_product",
    "matmul",
    "recorder_new",
    "recorder_read",
    "recorder_write",
    "saved_model_endpoints",
    "static_value",
    "vjp",
]
