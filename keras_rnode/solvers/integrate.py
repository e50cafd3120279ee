"""The forward loops: adaptive (embedded pairs) and fixed-step.

States are flat lists of tensors. Time runs as s = |t - t0| in [0, L]
so that forward and reverse solves share one loop. Optionally records
(s, h, y) at the start of every accepted step for the direct gradient.
"""

import math
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_rnode import backend, checks
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


def _all_finite(y):
    return ops.all(ops.stack([ops.all(ops.isfinite(v)) for v in y]))


def is_empty(y):
    """Whether every tensor of y has no entry: a Python bool where the shapes say, else (a
    batch size known only when the solve runs) a scalar boolean tensor."""
    empty = []
    for v in y:
        shape = checks.static_shape(v)
        if 0 in shape:
            continue
        if None not in shape:
            return False
        empty.append(ops.equal(ops.size(v), 0))
    return ops.all(ops.stack(empty)) if empty else True


def epsilon(dtype):
    """The machine epsilon of a floating dtype (float16, bfloat16, float32, float64)."""
    return float(np.finfo(np.dtype(keras.backend.standardize_dtype(dtype))).eps)


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


def integrate(func, settings, y0, t0, t1, *, controlled, record, idle=None):
    """Solve from t0 to t1 as `settings` (a SolverSettings) say. Returns (y1, stats, records).

    `controlled`: one flag per state, False to leave it out of step-size
    control. `records` is None unless `record`; then it is (recorder,
    count) where the recorder holds [s_and_h, *y] of each accepted step.
    `idle`: a scalar boolean, true when y0 is the answer (default: when
    every state is empty, an empty batch); the solve then takes no step and
    succeeds, as over a zero-length interval.
    """
    static_length = _static_length(t0, t1)
    t0, direction, length = time_frame(t0, t1, y0[0].dtype)
    idle = is_empty(y0) if idle is None else idle
    # An empty batch has no error to measure (0 / 0 in the RMS): it is not stepped.
    if idle is not False:
        length = ops.where(idle, ops.zeros_like(length), length)
    if settings.adaptive:
        return _adaptive(func, settings, y0, t0, direction, length, controlled, record)
    return _fixed(func, settings, y0, t0, direction, length, static_length, idle, record)


class _AdaptiveState(NamedTuple):
    """What the adaptive loop carries from one attempted step to the next."""

    s: object  # time travelled, |t - t0|
    h: object  # the step to attempt
    y: list
    k: list  # func(t, y): the first stage of the next step (FSAL)
    nfe: object
    accepted: object
    rejected: object
    underflow: object
    control: dict  # the step controller's own state
    recorder: list


def _adaptive(func, settings, y0, t0, direction, length, controlled, record):
    tableau, controller = settings.tableau, settings.controller
    dtype = keras.backend.standardize_dtype(y0[0].dtype)
    zero = ops.zeros((), dtype)
    zero_i = ops.zeros((), "int32")

    def start():
        f0 = func(t0, y0)
        if settings.first_step is not None:
            h0 = ops.minimum(ops.convert_to_tensor(settings.first_step, dtype), length)
            return [*f0, h0, ops.ones((), "int32")]
        h = controller.initial_step(func, t0, y0, f0, direction, length, tableau.order,
                                    controlled)
        return [*f0, h, 2 * ops.ones((), "int32")]

    def empty():
        return [*[ops.zeros_like(v) for v in y0], zero, zero_i]

    started = ops.cond(length > 0, start, empty)
    n = len(y0)
    recorder = (backend.recorder_new(settings.max_steps, [ops.zeros((2,), dtype), *y0])
                if record else [])
    eps = epsilon(dtype)
    per_step = tableau.stages - 1 if tableau.fsal else tableau.stages

    def cond(state):
        return ((state.s < length) & (state.accepted + state.rejected < settings.max_steps)
                & ~state.underflow)

    def body(state):
        last = state.h >= length - state.s
        h = ops.where(last, length - state.s, state.h)
        t = t0 + direction * state.s
        k = state.k if tableau.fsal else func(t, state.y)
        y_new, error, k_new = rk_step(func, tableau, t, state.y, direction * h, k)
        norm = controller.norm(error, state.y, y_new, controlled)
        ok, factor, control = controller.adapt(norm, state.control, tableau.order)
        recorder = state.recorder
        if record:
            recorder = backend.recorder_write(
                recorder, state.accepted, [ops.stack([state.s, h]), *state.y], ok)
        h_next = h * ops.cast(factor, dtype)  # a controller may compute in another dtype
        tiny = 4.0 * eps * ops.maximum(ops.abs(t), length)
        return (_AdaptiveState(
            s=ops.where(ok, ops.where(last, length, state.s + h), state.s),
            h=h_next,
            y=[ops.where(ok, a, b) for a, b in zip(y_new, state.y)],
            k=[ops.where(ok, a, b) for a, b in zip(k_new, k)] if tableau.fsal else k,
            nfe=state.nfe + per_step,
            accepted=state.accepted + ops.cast(ok, "int32"),
            rejected=state.rejected + ops.cast(~ok, "int32"),
            underflow=~ok & ~(h_next > tiny),  # a NaN step (from NaN derivatives) too
            control=control,
            recorder=recorder,
        ),)

    initial = _AdaptiveState(s=zero, h=started[n], y=list(y0), k=list(started[:n]),
                             nfe=started[n + 1], accepted=zero_i, rejected=zero_i,
                             underflow=ops.zeros((), "bool"),
                             control=controller.initial_state(dtype), recorder=recorder)
    (final,) = ops.while_loop(cond, body, (initial,))
    # A rejected step never enters y, but a state left out of error control
    # can carry NaN to the end.
    reached = ops.where(_all_finite(final.y), Status.SUCCESS.value, Status.NON_FINITE_STATE.value)
    status = ops.where(
        final.s >= length, reached,
        ops.where(final.underflow, Status.STEP_UNDERFLOW.value, Status.MAX_STEPS_REACHED.value),
    )
    records = (final.recorder, final.accepted) if record else None
    stats = _stats(final.nfe, final.accepted, final.rejected, status)
    return final.y, stats, records


def _fixed(func, settings, y0, t0, direction, length, static_length, idle, record):
    tableau, step_size, max_steps = settings.tableau, settings.step_size, settings.max_steps
    dtype = keras.backend.standardize_dtype(y0[0].dtype)
    if static_length is not None:
        count = fixed_step_count(static_length, step_size)
        steps = min(count, max_steps)
        capacity = max(steps, 1)
        if idle is not False:
            count = ops.where(idle, 0, count)
            steps = ops.where(idle, 0, steps)
    else:
        count = ops.cast(ops.ceil(length / step_size * (1 - 1e-9)), "int32")
        steps = ops.minimum(count, max_steps)
        capacity = max_steps
    h = length / ops.maximum(ops.cast(count, dtype), 1.0)
    recorder = backend.recorder_new(capacity, [ops.zeros((2,), dtype), *y0]) if record else []

    # A fixed step takes whatever comes: a state gone to NaN or inf stops the
    # loop, and the status says so.
    def cond(i, y, finite, recorder):
        return (i < steps) & finite

    def body(i, y, finite, recorder):
        s = ops.cast(i, dtype) * h
        t = t0 + direction * s
        if record:
            recorder = backend.recorder_write(
                recorder, i, [ops.stack([s, h]), *y], ops.ones((), "bool"))
        y_new, _, _ = rk_step(func, tableau, t, y, direction * h, func(t, y))
        return i + 1, y_new, _all_finite(y_new), recorder

    taken, y, finite, recorder = ops.while_loop(
        cond, body, (ops.zeros((), "int32"), list(y0), _all_finite(y0), recorder))
    status = ops.where(taken >= count, Status.SUCCESS.value, Status.MAX_STEPS_REACHED.value)
    status = ops.where(finite, status, Status.NON_FINITE_STATE.value)
    stats = _stats(taken * tableau.stages, taken, ops.zeros((), "int32"), status)
    return y, stats, ((recorder, taken) if record else None)
