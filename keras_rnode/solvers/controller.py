"""Step-size control of the adaptive solver: the error norm, accept or reject, the next step.

`StepController` owns its settings (safety factor, growth bounds) and the
state it keeps between steps; the adaptive loop only asks it for a first
step and, after each attempt, whether to accept and by how much to scale
the step. A controller with other rules (a PI controller, say) is another
class with the same three methods.
"""

from dataclasses import dataclass

from keras_rnode import checks

# keras is imported when used, so that the command line's help loads without it.


def _rms(values, scales):
    from keras import ops

    total = 0.0
    count = 0
    for v, s in zip(values, scales):
        total = total + ops.sum(ops.square(v / s))
        count = count + ops.size(v)
    return ops.sqrt(total / ops.cast(count, total.dtype))


def _controlled(values, controlled):
    return [v for v, c in zip(values, controlled) if c]


def error_norm(error, y0, y1, rtol, atol, controlled):
    """RMS of err / (atol + rtol * max(|y0|, |y1|)) over the controlled states."""
    from keras import ops

    scales = [atol + rtol * ops.maximum(ops.abs(a), ops.abs(b))
              for a, b in zip(_controlled(y0, controlled), _controlled(y1, controlled))]
    return _rms(_controlled(error, controlled), scales)


@dataclass(frozen=True)
class StepController:
    """The standard (integral) controller: h_next = h * clip(safety * norm^(-1/order)).

    Args:
        safety: the factor below the optimal step (Hairer; scipy: 0.9).
        min_factor, max_factor: bounds on the step's change per attempt.

    A step is accepted when its error norm is at most 1. After a rejection
    the step may not grow, not even when the next attempt is accepted
    (Hairer's rule, as in scipy's RK45): that is the controller's state.
    Raises ValueError for settings that are not numbers with
    0 < min_factor <= 1 <= max_factor and 0 < safety <= 1.
    """

    safety: float = 0.9
    min_factor: float = 0.2
    max_factor: float = 10.0

    def __post_init__(self):
        for name in ("safety", "min_factor", "max_factor"):
            object.__setattr__(self, name, checks.positive_finite(getattr(self, name), name))
        if self.safety > 1 or self.min_factor > 1 or self.max_factor < 1:
            raise ValueError(f"the step controller needs 0 < safety <= 1 and 0 < min_factor "
                             f"<= 1 <= max_factor, got {self}")

    def initial_state(self):
        """The state carried through the loop: whether the last attempt was rejected."""
        from keras import ops

        return {"after_reject": ops.zeros((), "bool")}

    def adapt(self, norm, state, order):
        """(accept, factor for the next step, new state) from this attempt's error norm.

        A NaN or inf norm rejects and shrinks by min_factor; a zero norm
        grows by max_factor.
        """
        from keras import ops

        accept = ops.isfinite(norm) & (norm <= 1.0)
        finite = ops.isfinite(norm)
        safe = ops.where(finite & (norm > 0), norm, ops.ones_like(norm))
        factor = self.safety * safe ** (-1.0 / order)
        factor = ops.where(norm == 0, self.max_factor, factor)
        factor = ops.where(finite, factor, self.min_factor)
        factor = ops.clip(factor, self.min_factor, self.max_factor)
        may_grow = accept & ~state["after_reject"]
        factor = ops.where(may_grow, factor, ops.minimum(factor, 1.0))
        return accept, factor, {"after_reject": ~accept}

    def initial_step(self, func, t0, y0, f0, direction, length, order, rtol, atol, controlled):
        """Hairer, Norsett & Wanner's starting step (Solving ODEs I, II.4).

        Costs one evaluation of func besides f0. Returns a positive magnitude.
        """
        from keras import ops

        y0_c = _controlled(y0, controlled)
        scales = [atol + rtol * ops.abs(y) for y in y0_c]
        d0 = _rms(y0_c, scales)
        d1 = _rms(_controlled(f0, controlled), scales)
        small = (d0 < 1e-5) | (d1 < 1e-5)
        h0 = ops.where(small, 1e-6, 0.01 * d0 / ops.where(small, 1.0, d1))
        h0 = ops.minimum(h0, length)
        y1 = [y + direction * h0 * f for y, f in zip(y0, f0)]
        f1 = func(t0 + direction * h0, y1)
        d2 = _rms([a - b for a, b in zip(_controlled(f1, controlled),
                                          _controlled(f0, controlled))], scales) / h0
        dmax = ops.maximum(d1, d2)
        flat = dmax <= 1e-15
        h1 = ops.where(
            flat,
            ops.maximum(1e-6, h0 * 1e-3),
            (0.01 / ops.where(flat, 1.0, dmax)) ** (1.0 / order),
        )
        return ops.minimum(ops.minimum(100.0 * h0, h1), length)
