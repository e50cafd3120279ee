"""The one place that knows which Keras backend runs.

Everything backend-specific that the solver needs sits behind these
names, each defined by every backend module (tensorflow.py, jax.py,
torch.py): a solve whose gradient we define ourselves, a vector-Jacobian
product with respect to states and parameters, the Jacobian product of
the Hutchinson estimator, the recorder that keeps the accepted steps for
the direct gradient, a compiled inference function, a dtype-keeping
matmul and a tensor's value where it is known while tracing.
"""

import importlib

import keras

NAME = keras.backend.backend()
HOOKS = (
    "differentiable_solve",
    "inference_function",
    "jacobian_product",
    "matmul",
    "recorder_new",
    "recorder_read",
    "recorder_write",
    "static_value",
    "vjp",
)

if NAME not in ("tensorflow", "jax", "torch"):
    raise ImportError(
        f"keras-rnode runs on the tensorflow, jax and torch Keras backends; "
        f"KERAS_BACKEND={NAME!r} is not supported.")
_implementation = importlib.import_module(f"keras_rnode.backend.{NAME}")
globals().update({name: getattr(_implementation, name) for name in HOOKS})

# A custom JAX gradient is a pure function: it cannot report the backward
# solve's statistics (CNF.stats["backward_nfe"] stays 0 there).
REPORTS_BACKWARD = NAME != "jax"

__all__ = ["NAME", "REPORTS_BACKWARD", *HOOKS]
