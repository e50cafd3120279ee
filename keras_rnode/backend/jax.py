"""JAX implementations of the backend hooks."""

import jax
import jax.numpy as jnp
import numpy as np

from keras_rnode.backend.common import matmul, recorder_read  # noqa: F401  (hooks)


def differentiable_solve(func, y0, inputs, forward, backward):
    """forward(func, y0, inputs) -> (y1, stats, residuals), with a gradient of our own.

    `lax.while_loop` has no reverse-mode derivative, so the solve is a
    `jax.custom_vjp`. Its rule must see every value being differentiated
    as an argument, but the dynamics read their weights from Keras's
    state (tracers when inside `jax.grad`), and perhaps other traced
    values from their closure: `jax.closure_convert` hoists all those out
    of func as explicit `params`. func(t, y, inputs) is the dynamics;
    `inputs` (end times, `args`) are differentiated like y0.
    backward(func_p, params, y0, inputs, residuals, y1, grads_y1) ->
    (grads_y0, grads_inputs, grads_params) with func_p(t, y, inputs,
    params). backward=None: no gradient.
    """
    t_like = jnp.zeros((), y0[0].dtype)
    func_c, params = jax.closure_convert(lambda t, y, i: func(t, y, i), t_like, list(y0),
                                         list(inputs))

    def func_p(t, y, i, p):
        return func_c(t, y, i, *p)

    def bound(p):
        return lambda t, y, i: func_p(t, y, i, p)

    if backward is None:
        stop = jax.lax.stop_gradient
        y1, stats, _ = forward(bound([stop(v) for v in params]), [stop(v) for v in y0],
                               [stop(v) for v in inputs])
        return y1, stats

    @jax.custom_vjp
    def run(y0_, inputs_, p):
        y1, stats, _ = forward(bound(p), y0_, inputs_)
        return y1, stats

    def run_fwd(y0_, inputs_, p):
        y1, stats, residuals = forward(bound(p), y0_, inputs_)
        return (y1, stats), (residuals, y0_, inputs_, y1, p)

    def run_bwd(saved, cotangents):
        residuals, y0_, inputs_, y1, p = saved
        grads_y1, _ = cotangents  # the integer stats have no cotangent
        grads_y1 = [jnp.zeros_like(y) if g is None else g for y, g in zip(y1, grads_y1)]
        grads = backward(func_p, list(p), y0_, inputs_, residuals, y1, grads_y1)
        return tuple(list(g) for g in grads)

    run.defvjp(run_fwd, run_bwd)
    y1, stats = run(list(y0), list(inputs), list(params))
    return list(y1), list(stats)


def jacobian_product(fn, z, v):
    """(fn(z), J v) with J = dfn/dz: one forward-mode product (DESIGN.md)."""
    return jax.jvp(fn, (z,), (v,))


def host_call(fn, args, shape, dtype):
    """fn(*numpy arrays) -> a NumPy array of `shape` and `dtype`, called from a jitted
    function (jax.pure_callback: the host runs it, on a CPU or beside a GPU)."""
    spec = jax.ShapeDtypeStruct(tuple(int(s) for s in shape), dtype)
    return jax.pure_callback(lambda *a: np.asarray(fn(*map(np.asarray, a)), dtype), spec,
                             *args)


HOST_CALLS_COMPILE = True


def jvp(fn, primals, tangents):
    """(fn(*primals), J tangents): one forward-mode product."""
    return jax.jvp(fn, tuple(primals), tuple(tangents))


def vjp(fn, primals, params, cotangents):
    """fn(primals, params) -> outputs (a list); returns (outputs, grads_primals, grads_params)."""
    outputs, pullback = jax.vjp(fn, list(primals), list(params))
    grads_primals, grads_params = pullback(list(cotangents))
    return outputs, grads_primals, grads_params


def recorder_new(size, like):
    """Storage for one tensor per accepted step, for each tensor in `like`."""
    return [jnp.zeros((size, *v.shape), v.dtype) for v in like]


def recorder_write(recorder, index, values, pred):
    """Write `values` at `index` when `pred` holds (a scalar boolean tensor)."""
    # Select the row, not the whole record: XLA updates in place.
    return [r.at[index].set(jnp.where(pred, v, r[index])) for r, v in zip(recorder, values)]


def inference_function(model, fn, input_shapes=None):
    """fn(*inputs) jit-compiled, with the model's state passed in and written back.

    Eager JAX retraces the solver's loops on every call (seconds a batch);
    a jitted function must not write Keras variables from inside, so the
    state it changes (solver stats, seed generators) comes out as values.
    """
    import keras

    variables = list(model.variables)

    @jax.jit
    def pure(values, *inputs):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))) as scope:
            out = fn(*inputs)
        new = [scope.get_current_value(v) for v in variables]
        return out, [old if n is None else n for old, n in zip(values, new)]

    def run(*inputs):
        out, values = pure([v.value for v in variables], *inputs)
        for v, value in zip(variables, values):
            if not v.trainable:
                v.assign(value)
        return out

    return run


def static_value(x):
    """x as NumPy where it is known without running a trace, else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def saved_model_endpoints():
    """The endpoints a SavedModel export writes from JAX (through jax2tf): log_prob alone.

    sample(n) takes its count as a tensor, and under JAX a count cannot
    set a shape (shapes are static).
    """
    return ("log_prob",)
