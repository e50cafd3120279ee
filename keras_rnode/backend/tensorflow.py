"""TensorFlow implementations of the backend hooks."""

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import record

from keras_rnode.backend.common import matmul  # noqa: F401  (a hook)


def differentiable_solve(func, y0, inputs, forward, backward):
    """forward(func, y0, inputs) -> (y1, stats, residuals), with a gradient of our own.

    func(t, y, inputs) is the dynamics; `inputs` (end times, `args`) are
    differentiated like y0. backward(func_p, params, y0, inputs, residuals,
    y1, grads_y1) -> (grads_y0, grads_inputs, grads_params) runs when a tape
    asks for gradients, with func_p(t, y, inputs, params). Here `params`
    are what func reads besides y and inputs that a tape records: the
    trainable variables (TensorFlow finds them for us) and the tensors func
    captures from outside the solve (`_recorded_captures` finds those; a
    custom gradient would otherwise leave them at None). func reads them
    all itself. No gradient is ever taken through the solver's loops, so
    TensorFlow keeps no per-iteration stacks (the cause of XLA's slowness
    with `maximum_iterations`). backward=None: no gradient.
    """
    n, m = len(y0), len(inputs)
    if backward is None:
        # On the outputs: a gradient must not reach the weights through the loops.
        y1, stats, _ = forward(func, y0, inputs)
        return [tf.stop_gradient(v) for v in y1], stats
    captured = _recorded_captures(func, y0, inputs)

    @tf.custom_gradient
    def run(*flat):
        y0_, inputs_, captured_ = list(flat[:n]), list(flat[n:n + m]), list(flat[n + m:])
        y1, stats, residuals = forward(func, y0_, inputs_)

        def grad(*dys, variables=None):
            dys = [tf.zeros_like(y) if d is None else d for y, d in zip(y1, dys[:n])]
            grads_y0, grads_inputs, grads_params = backward(
                lambda t, y, i, p: func(t, y, i), captured_ + list(variables or []), y0_,
                inputs_, residuals, y1, dys)
            flat_grads = [*grads_y0, *grads_inputs, *grads_params[:len(captured_)]]
            if variables is None:
                return flat_grads
            return flat_grads, list(grads_params[len(captured_):])

        return (*y1, *stats), grad

    out = run(*y0, *inputs, *captured)
    return list(out[:n]), list(out[n:])


def _recorded_captures(func, y0, inputs):
    """The floating tensors func reads from outside the solve that a gradient tape records.

    Tracing func into a graph lists what it captures (variables come as
    resource handles and are left out: TensorFlow finds those itself); of
    those, the ones some active tape records need a gradient. Nothing is
    traced when no tape could be recording. Uses two names of
    tensorflow.python.eager.record, which tests/test_keras_private_api.py
    watches.
    """
    if not record.could_possibly_record():
        return []
    specs = [tf.TensorSpec.from_tensor(tf.convert_to_tensor(v)) for v in [*y0, *inputs]]
    n = len(y0)
    concrete = tf.function(lambda t, *values: func(t, list(values[:n]), list(values[n:]))
                           ).get_concrete_function(tf.TensorSpec((), y0[0].dtype), *specs)
    return [c for c in concrete.captured_inputs
            if c.dtype.is_floating and record.should_record_backprop([c])]


def jacobian_product(fn, z, v):
    """(fn(z), v^T J) with J = dfn/dz: one reverse-mode product.

    Not the forward-mode J v (tf.autodiff.ForwardAccumulator): under a
    GradientTape inside a jit-compiled while loop, forward mode makes XLA
    treat every input, the weights included, as a compile-time constant,
    so each training step recompiled (9 s a step instead of 30 ms).
    Both products give the same Hutchinson estimates in expectation
    (tr J = E[v^T J v], ||J||_F^2 = E||J v||^2 = E||v^T J||^2); the RNODE
    reference implementation uses this one too.
    """
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(z)
        f = fn(z)
    return f, tape.gradient(f, z, output_gradients=v)


def host_call(fn, args, shape, dtype):
    """fn(*numpy arrays) -> a NumPy array of `shape` and `dtype`, called from the graph.

    tf.numpy_function: graph mode runs it, XLA cannot (HOST_CALLS_COMPILE).
    """
    out = tf.numpy_function(lambda *a: np.asarray(fn(*a), dtype), list(args), tf.as_dtype(dtype),
                            stateful=False)
    out.set_shape(tuple(s if isinstance(s, int) else None for s in shape))
    return out


# tf.numpy_function has no XLA kernel.
HOST_CALLS_COMPILE = False


def jvp(fn, primals, tangents):
    """(fn(*primals), J tangents): a forward-mode product by two reverse-mode ones.

    J v = d/du <J^T u, v>, J^T u being linear in a dummy cotangent u; a
    ForwardAccumulator would make XLA treat every input as a compile-time
    constant inside the solver's loop (see `jacobian_product`).
    """
    with tf.GradientTape(watch_accessed_variables=False) as outer:
        with tf.GradientTape(watch_accessed_variables=False) as inner:
            inner.watch(primals)
            out = fn(*primals)
        u = tf.zeros_like(out)
        outer.watch(u)
        pulled = inner.gradient(out, primals, output_gradients=u,
                                unconnected_gradients=tf.UnconnectedGradients.ZERO)
    product = outer.gradient(pulled, u, output_gradients=list(tangents),
                             unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return out, product


def vjp(fn, primals, params, cotangents):
    """fn(primals, params) -> outputs (a list); returns (outputs, grads_primals, grads_params)."""
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(primals)
        tape.watch(params)
        outputs = fn(primals, params)
    grads = tape.gradient(
        outputs,
        list(primals) + list(params),
        output_gradients=cotangents,
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
    )
    return outputs, grads[: len(primals)], grads[len(primals):]


def recorder_new(size, like):
    """Storage for one tensor per accepted step, for each tensor in `like`."""
    return [
        tf.TensorArray(v.dtype, size=size, element_shape=v.shape, clear_after_read=False)
        for v in like
    ]


def recorder_write(recorder, index, values, pred):
    """Write `values` at `index` when `pred` holds (a scalar boolean tensor)."""
    return tf.cond(
        pred,
        lambda: [ta.write(index, v) for ta, v in zip(recorder, values)],
        lambda: list(recorder),
    )


def recorder_read(recorder, index):
    """The tensors written at `index`, one per TensorArray."""
    return [ta.read(index) for ta in recorder]


def inference_function(model, fn, input_shapes=None):
    """fn(*inputs) traced once for any batch size: float32 inputs of `input_shapes`
    (None for the batch; default: the model's events alone)."""
    shapes = input_shapes or [(None, *model.event_shape)]
    return tf.function(fn, input_signature=[tf.TensorSpec(s, tf.float32) for s in shapes])


def static_value(x):
    """x as NumPy where it is known without running a graph (eager, constant), else None."""
    return tf.get_static_value(x)


def saved_model_endpoints():
    """The endpoints a SavedModel export writes from TensorFlow: log_prob and sample."""
    return ("log_prob", "sample")
