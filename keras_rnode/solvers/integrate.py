"""The forward loops: adaptive (embedded pairs) and fixed-step.

States are flat lists of tensors. Time runs as s = |t - t0| in [0, L]
so that forward and reverse solves share one loop. Optionally records
(s, h, y) at the start of every accepted step for the direct gradient.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_rnode import backend
from keras_rnode.solvers import controller
from keras_rnode.solvers.solution import Status
from keras_rnode.solvers.stepping import rk_step


def _stats(nfe, accepted, rejected, status):
    return [ops.cast(v, "int32") for v in (nfe, accepted, rejected, status)]


def _static_length(t0, t1):
    """|t1 - t0| when both are Python numbers: the step count of a fixed-step
    solve is then known while tracing, and the direct gradient's record is
    sized to it instead of max_steps."""
    if isinstance(t0, (int, float)) and isinstance(t1, (int, float)):
        return abs(float(t1) - float(t0))
    return None


def fixed_step_count(length, step_size):
    # Uniform steps that land exactly on t1; the small slack keeps
    # 1.0 / 0.1 from becoming 11 steps.
    return max(int(math.ceil(length / step_size * (1 - 1e-9))), 1 if length > 0 else 0)


def time_frame(t0, t1, dtype):
    """(t0, direction, length) in the states' dtype: t = t0 + direction * s."""
    # convert_to_tensor, not cast: ops.cast(1.3, "float64") goes through
    # float32 and shifts the end time by 5e-8.
    t0 = ops.convert_to_tensor(t0, dtype)
    t1 = ops.convert_to_tensor(t1, dtype)
    direction = ops.where(t1 >= t0, ops.ones_like(t0), -ops.ones_like(t0))
    return t0, direction, ops.abs(t1 - t0)


def integrate(func, tableau, y0, t0, t1, *, rtol, atol, max_steps, step_size,
              first_step, controlled, record):
    """Solve from t0 to t1. Returns (y1, stats, records).

    `records` is None unless `record`; then it is (recorder, count) where
    the recorder holds [s_and_h, *y] of each accepted step.
    """
    static_length = _static_length(t0, t1)
    t0, direction, length = time_frame(t0, t1, y0[0].dtype)
    if tableau.adaptive:
        return _adaptive(func, tableau, y0, t0, direction, length, rtol, atol,
                         max_steps, first_step, controlled, record)
    return _fixed(func, tableau, y0, t0, direction, length, static_length, step_size,
                  max_steps, record)


def _adaptive(func, tableau, y0, t0, direction, length, rtol, atol, max_steps,
              first_step, controlled, record):
    dtype = keras.backend.standardize_dtype(y0[0].dtype)
    zero = ops.zeros((), dtype)

    def start():
        f0 = func(t0, y0)
        if first_step is not None:
            h0 = ops.minimum(ops.convert_to_tensor(first_step, dtype), length)
            return [*f0, h0, ops.ones((), "int32")]
        h = controller.initial_step(func, t0, y0, f0, direction, length,
                                    tableau.order, rtol, atol, controlled)
        return [*f0, h, 2 * ops.ones((), "int32")]

    def empty():
        return [*[ops.zeros_like(v) for v in y0], zero, ops.zeros((), "int32")]

    started = ops.cond(length > 0, start, empty)
    n = len(y0)
    k1, h, nfe = list(started[:n]), started[n], started[n + 1]
    recorder = backend.recorder_new(max_steps, [ops.zeros((2,), dtype), *y0]) if record else []
    eps = float(np.finfo(np.dtype(dtype)).eps)
    per_step = tableau.stages - 1 if tableau.fsal else tableau.stages

    # `after_reject`: the previous attempt was rejected, so this step may
    # not grow even if accepted (Hairer's rule, as in scipy's RK45).
    def cond(s, h, y, k, nfe, accepted, rejected, underflow, after_reject, recorder):
        return (s < length) & (accepted + rejected < max_steps) & ~underflow

    def body(s, h, y, k, nfe, accepted, rejected, underflow, after_reject, recorder):
        last = h >= length - s
        h_use = ops.where(last, length - s, h)
        t = t0 + direction * s
        if not tableau.fsal:
            k = func(t, y)
        y_new, error, k_new = rk_step(func, tableau, t, y, direction * h_use, k)
        norm = controller.error_norm(error, y, y_new, rtol, atol, controlled)
        ok = ops.isfinite(norm) & (norm <= 1.0)
        if record:
            recorder = backend.recorder_write(
                recorder, accepted, [ops.stack([s, h_use]), *y], ok)
        h_next = h_use * controller.step_factor(norm, ok & ~after_reject, tableau.order)
        tiny = 4.0 * eps * ops.maximum(ops.abs(t), length)
        return (
            ops.where(ok, ops.where(last, length, s + h_use), s),
            h_next,
            [ops.where(ok, a, b) for a, b in zip(y_new, y)],
            [ops.where(ok, a, b) for a, b in zip(k_new, k)] if tableau.fsal else k,
            nfe + per_step,
            accepted + ops.cast(ok, "int32"),
            rejected + ops.cast(~ok, "int32"),
            ~ok & ~(h_next > tiny),  # a NaN step (from NaN derivatives) too
            ~ok,
            recorder,
        )

    zero_i = ops.zeros((), "int32")
    s, _, y, _, nfe, accepted, rejected, underflow, _, recorder = ops.while_loop(
        cond, body,
        (zero, h, list(y0), k1, nfe, zero_i, zero_i, ops.zeros((), "bool"),
         ops.zeros((), "bool"), recorder),
    )
    status = ops.where(
        s >= length, Status.SUCCESS,
        ops.where(underflow, Status.STEP_UNDERFLOW, Status.MAX_STEPS_REACHED),
    )
    records = (recorder, accepted) if record else None
    return y, _stats(nfe, accepted, rejected, status), records


def _fixed(func, tableau, y0, t0, direction, length, static_length, step_size, max_steps,
           record):
    dtype = keras.backend.standardize_dtype(y0[0].dtype)
    if static_length is not None:
        count = fixed_step_count(static_length, step_size)
        steps = min(count, max_steps)
        capacity = max(steps, 1)
    else:
        count = ops.cast(ops.ceil(length / step_size * (1 - 1e-9)), "int32")
        steps = ops.minimum(count, max_steps)
        capacity = max_steps
    h = length / ops.maximum(ops.cast(count, dtype), 1.0)
    recorder = backend.recorder_new(capacity, [ops.zeros((2,), dtype), *y0]) if record else []

    def cond(i, y, recorder):
        return i < steps

    def body(i, y, recorder):
        s = ops.cast(i, dtype) * h
        t = t0 + direction * s
        if record:
            recorder = backend.recorder_write(
                recorder, i, [ops.stack([s, h]), *y], ops.ones((), "bool"))
        y_new, _, _ = rk_step(func, tableau, t, y, direction * h, func(t, y))
        return i + 1, y_new, recorder

    _, y, recorder = ops.while_loop(
        cond, body, (ops.zeros((), "int32"), list(y0), recorder))
    steps = ops.convert_to_tensor(steps, "int32")
    status = ops.where(steps >= count, Status.SUCCESS, Status.MAX_STEPS_REACHED)
    stats = _stats(steps * tableau.stages, steps, ops.zeros((), "int32"), status)
    return y, stats, ((recorder, steps) if record else None)
