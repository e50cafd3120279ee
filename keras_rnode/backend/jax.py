"""JAX implementations of the backend hooks."""

import jax
import jax.numpy as jnp
import numpy as np

from keras_rnode.backend.common import matmul, recorder_read  # noqa: F401  (hooks)


def differentiable_solve(func, y0, forward, backward):
    """forward(func, y0) -> (y1, stats, residuals), with a gradient of our own.

    `lax.while_loop` has no reverse-mode derivative, so the solve is a
    `jax.custom_vjp`. Its rule must see every value being differentiated
    as an argument, but the dynamics read their weights from Keras's
    state (tracers when inside `jax.grad`): `jax.closure_convert` hoists
    those out of func as explicit `params`. backward(func_p, params,
    residuals, y1, grads_y1) -> (grads_y0, grads_params) with
    func_p(t, y, params). backward=None: no gradient.
    """
    t_like = jnp.zeros((), y0[0].dtype)
    func_p, params = jax.closure_convert(lambda t, y: func(t, y), t_like, list(y0))

    def bound(p):
        return lambda t, y: func_p(t, y, *p)

    if backward is None:
        p = [jax.lax.stop_gradient(v) for v in params]
        y1, stats, _ = forward(bound(p), [jax.lax.stop_gradient(v) for v in y0])
        return y1, stats

    @jax.custom_vjp
    def run(y0_, p):
        y1, stats, _ = forward(bound(p), y0_)
        return y1, stats

    def run_fwd(y0_, p):
        y1, stats, residuals = forward(bound(p), y0_)
        return (y1, stats), (residuals, y1, p)

    def run_bwd(saved, cotangents):
        residuals, y1, p = saved
        grads_y1, _ = cotangents  # the integer stats have no cotangent
        grads_y1 = [jnp.zeros_like(y) if g is None else g for y, g in zip(y1, grads_y1)]
        grads_y0, grads_p = backward(
            lambda t, y, p_: func_p(t, y, *p_), list(p), residuals, y1, grads_y1)
        return list(grads_y0), list(grads_p)

    run.defvjp(run_fwd, run_bwd)
    y1, stats = run(list(y0), list(params))
    return list(y1), list(stats)


def jacobian_product(fn, z, v):
    """(fn(z), J v) with J = dfn/dz: one forward-mode product (DESIGN.md)."""
    return jax.jvp(fn, (z,), (v,))


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


def inference_function(model, fn):
    """fn(x) jit-compiled, with the model's state passed in and written back.

    Eager JAX retraces the solver's loops on every call (seconds a batch);
    a jitted function must not write Keras variables from inside, so the
    state it changes (solver stats, seed generators) comes out as values.
    """
    import keras

    variables = list(model.variables)

    @jax.jit
    def pure(values, x):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))) as scope:
            out = fn(x)
        new = [scope.get_current_value(v) for v in variables]
        return out, [old if n is None else n for old, n in zip(values, new)]

    def run(x):
        out, values = pure([v.value for v in variables], x)
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
