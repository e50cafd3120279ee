"""What the multi-backend tests need from each backend: gradients and compiled modes."""

import keras
import numpy as np
import pytest
from keras import ops

BACKEND = keras.backend.backend()

tf_only = pytest.mark.skipif(BACKEND != "tensorflow", reason="a TensorFlow-only path")

# Ways a function can run: eager everywhere, and compiled where the backend compiles.
MODES = {"tensorflow": ("eager", "graph", "jit"), "jax": ("eager", "jit"),
         "torch": ("eager",)}[BACKEND]


def np_(x):
    return np.asarray(ops.convert_to_numpy(x))


def build_optimizer(model):
    """Build a compiled, built model's optimizer before `fit`, which on TensorFlow
    otherwise builds it in the train step's first trace; a tf.function that makes
    variables traces twice, so this halves the first step's tracing."""
    model.optimizer.build(model.trainable_variables)
    return model


def f64(x):
    # The dtype explicitly: Keras's PyTorch backend turns float64 arrays into float32.
    return ops.convert_to_tensor(np.asarray(x, dtype="float64"), dtype="float64")


def compiled(fn, mode):
    if mode == "eager":
        return fn
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=mode == "jit")
    import jax

    return jax.jit(fn)


def gradients(loss_fn, tensors=(), variables=()):
    """(loss, grads of tensors, grads of Keras variables) of loss_fn(*tensors).

    Gradients of variables not read are zeros; the results are backend
    tensors (call np_ on them).
    """
    tensors, variables = list(tensors), list(variables)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(tensors)
            loss = loss_fn(*tensors)
        grads = tape.gradient(loss, tensors + [v.value for v in variables],
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return loss, grads[:len(tensors)], grads[len(tensors):]
    if BACKEND == "jax":
        import jax

        def pure(ts, vs):
            with keras.StatelessScope(state_mapping=list(zip(variables, vs))):
                return loss_fn(*ts)

        loss, (g_t, g_v) = jax.value_and_grad(pure, argnums=(0, 1))(
            tensors, [v.value for v in variables])
        return loss, list(g_t), list(g_v)
    import torch

    tensors = [ops.convert_to_tensor(t).detach().requires_grad_() for t in tensors]
    loss = loss_fn(*tensors)
    inputs = tensors + [v.value for v in variables]
    if not loss.requires_grad:  # nothing reached: every gradient is zero
        return loss, [torch.zeros_like(x) for x in tensors], [
            torch.zeros_like(x) for x in inputs[len(tensors):]]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
    return loss.detach(), grads[:len(tensors)], grads[len(tensors):]


def assert_same_step(one, two):
    """Two data-parallel runs of one SGD step agree: loss, nll and kinetic to 1e-5, and the
    weight changes (-lr * gradient, so the gradients) to 1e-4; `one` and `two` are dicts of
    those logs and "step" (the change of each weight)."""
    for key in ("loss", "nll", "kinetic"):
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5, err_msg=key)
    moved = max(np.max(np.abs(s)) for s in one["step"])
    assert moved > 1e-4
    for a, b in zip(two["step"], one["step"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * moved)
