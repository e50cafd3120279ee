"""One explicit Runge-Kutta step over a list of state tensors."""

from keras import ops


def _combine(y, h, coeffs, ks):
    """y + h * sum_l coeffs[l] * ks[l], skipping zero coefficients."""
    out = []
    for j, yj in enumerate(y):
        acc = None
        for c, k in zip(coeffs, ks):
            if c != 0.0:
                term = c * k[j]
                acc = term if acc is None else acc + term
        out.append(yj if acc is None else yj + h * acc)
    return out


def rk_step(func, tableau, t, y, h, k1, with_error=True):
    """Advance the state list `y` from t by a signed step h.

    `k1` is func(t, y), already known (FSAL, or computed by the caller).
    Returns (y_new, error, k_last): `error` is the embedded estimate (None
    for fixed-step methods or with_error=False) and `k_last` is func at
    the new point for FSAL methods (None otherwise).
    """
    ks = [k1]
    stages = tableau.stages
    if tableau.fsal and not with_error:
        # For FSAL pairs the last stage only serves the error estimate.
        stages -= 1
    for i in range(1, stages):
        yi = _combine(y, h, tableau.a[i - 1], ks)
        ks.append(func(t + tableau.c[i] * h, yi))
    if tableau.fsal:
        y_new = yi if stages == tableau.stages else _combine(y, h, tableau.b, ks)
    else:
        y_new = _combine(y, h, tableau.b, ks)
    if not (with_error and tableau.adaptive):
        return y_new, None, None
    zeros = [ops.zeros_like(v) for v in y]
    error = _combine(zeros, h, tableau.error, ks)
    return y_new, error, ks[-1] if tableau.fsal else None
