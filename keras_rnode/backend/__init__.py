"""The one place that knows which Keras backend runs.

Everything backend-specific that the solver needs sits behind these
names, each defined by every backend module (tensorflow.py, jax.py,
torch.py), or taken by it from the shared defaults (common.py): a solve
whose gradient we define ourselves, a vector-Jacobian product with
respect to states and parameters, the Jacobian product of the Hutchinson
estimator, a forward-mode (Jacobian-vector) product for the penalties
that need one, the recorder that keeps the accepted steps for the direct
gradient, a NumPy function called from compiled code (the OT assignment
of flow matching), a compiled inference function, a dtype-keeping matmul, a
tensor's value where it is known while tracing, and the SavedModel
endpoints an export can write.

`implementation` is the running backend's module, picked by name in one
if-chain as Keras picks its own, so a reader or an editor follows each
hook below to its definition there.
"""

import keras

NAME = keras.backend.backend()

if NAME == "tensorflow":
    from keras_rnode.backend import tensorflow as implementation
elif NAME == "jax":
    from keras_rnode.backend import jax as implementation
elif NAME == "torch":
    from keras_rnode.backend import torch as implementation
else:
    raise ImportError(
        f"keras-rnode runs on the tensorflow, jax and torch Keras backends; "
        f"KERAS_BACKEND={NAME!r} is not supported.")

differentiable_solve = implementation.differentiable_solve
host_call = implementation.host_call
inference_function = implementation.inference_function
jacobian_product = implementation.jacobian_product
jvp = implementation.jvp
matmul = implementation.matmul
recorder_new = implementation.recorder_new
recorder_read = implementation.recorder_read
recorder_write = implementation.recorder_write
saved_model_endpoints = implementation.saved_model_endpoints
static_value = implementation.static_value
vjp = implementation.vjp

# A custom JAX gradient is a pure function: it cannot report the backward
# solve's statistics (CNF.stats["backward_nfe"] stays 0 there).
REPORTS_BACKWARD = NAME != "jax"
# Whether a compiled (XLA) step can call the host (`host_call`): not on TensorFlow.
HOST_CALLS_COMPILE = implementation.HOST_CALLS_COMPILE



def jit_by_default(conv):
    """Whether a training step compiles with XLA unless told (`rnode train --jit auto`).

    TensorFlow: yes for dense dynamics and on a GPU; no for conv dynamics
    on a CPU, where XLA's step was measured several times slower than graph
    mode (benchmarks/RESULTS.md, "XLA or graph mode for `rnode train --jit
    auto`"). JAX: always (an uncompiled step retraces the solver's loops at
    every step). PyTorch: never (its jit_compile is torch.compile, which the
    solver's loops are not written for). Call it after any device set-up.
    """
    if NAME == "jax":
        return True
    if NAME == "torch":
        return False
    return not conv or bool(keras.distribution.list_devices("gpu"))


__all__ = [
    "HOST_CALLS_COMPILE",
    "NAME",
    "REPORTS_BACKWARD",
    "jit_by_default",
    "differentiable_solve",
    "host_call",
    "inference_function",
    "jacobian_product",
    "jvp",
    "matmul",
    "recorder_new",
    "recorder_read",
    "recorder_write",
    "saved_model_endpoints",
    "static_value",
    "vjp",
]
