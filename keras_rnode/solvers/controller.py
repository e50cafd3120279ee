"""Step-size control: error norm, step update and Hairer's initial step."""

from keras import ops

SAFETY = 0.9
MIN_FACTOR = 0.2
MAX_FACTOR = 10.0


def _rms(values, scales):
    total = 0.0
    count = 0
    for v, s in zip(values, scales):
        total = total + ops.sum(ops.square(v / s))
        count = count + ops.size(v)
    return ops.sqrt(total / ops.cast(count, total.dtype))


def error_norm(error, y0, y1, rtol, atol, controlled):
    """RMS of err / (atol + rtol * max(|y0|, |y1|)) over the controlled states."""
    pick = [i for i, c in enumerate(controlled) if c]
    scales = [atol + rtol * ops.maximum(ops.abs(y0[i]), ops.abs(y1[i])) for i in pick]
    return _rms([error[i] for i in pick], scales)


def step_factor(norm, may_grow, order):
    """Factor for the next step size from the error norm of this one.

    A NaN or inf norm shrinks by the smallest factor. With `may_grow`
    False (a rejected step, or an accepted one right after a rejection)
    the factor is at most 1.
    """
    finite = ops.isfinite(norm)
    safe = ops.where(finite & (norm > 0), norm, ops.ones_like(norm))
    factor = SAFETY * safe ** (-1.0 / order)
    factor = ops.where(norm == 0, MAX_FACTOR, factor)
    factor = ops.where(finite, factor, MIN_FACTOR)
    factor = ops.clip(factor, MIN_FACTOR, MAX_FACTOR)
    return ops.where(may_grow, factor, ops.minimum(factor, 1.0))


def initial_step(func, t0, y0, f0, direction, length, order, rtol, atol, controlled):
    """Hairer, Norsett & Wanner's starting step (Solving ODEs I, II.4).

    Costs one evaluation of func besides f0. Returns a positive magnitude.
    """
    pick = [i for i, c in enumerate(controlled) if c]
    scales = [atol + rtol * ops.abs(y0[i]) for i in pick]
    d0 = _rms([y0[i] for i in pick], scales)
    d1 = _rms([f0[i] for i in pick], scales)
    small = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = ops.where(small, 1e-6, 0.01 * d0 / ops.where(small, 1.0, d1))
    h0 = ops.minimum(h0, length)
    y1 = [y + direction * h0 * f for y, f in zip(y0, f0)]
    f1 = func(t0 + direction * h0, y1)
    d2 = _rms([f1[i] - f0[i] for i in pick], scales) / h0
    dmax = ops.maximum(d1, d2)
    flat = dmax <= 1e-15
    h1 = ops.where(
        flat,
        ops.maximum(1e-6, h0 * 1e-3),
        (0.01 / ops.where(flat, 1.0, dmax)) ** (1.0 / order),
    )
    return ops.minimum(ops.minimum(100.0 * h0, h1), length)
