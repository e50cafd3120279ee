"""A proportional-integral (PI) step-size controller.

The integral controller sizes each step from the last error alone, which
on oscillatory or mildly stiff problems makes the step swing above and
below what the problem allows, with a rejection at each swing. A PI
controller also feeds back the previous accepted step's error, which damps
the swing (Gustafsson, "Control theoretic techniques for stepsize
selection in explicit Runge-Kutta methods", ACM TOMS 17, 1991; Hairer &
Wanner, Solving ODEs II, Section IV.2, "A PI step size control"):

    factor = safety * r_n^(-(pcoeff + icoeff) / k) * r_(n-1)^(pcoeff / k)

with r_n this attempt's error norm, r_(n-1) the last accepted one's and k
the method's order (5 for dopri5). pcoeff = 0, icoeff = 1 is the integral
controller; the defaults are Gustafsson's (alpha = 0.7/k, beta = 0.4/k).
"""

from dataclasses import dataclass

from keras_rnode import checks
from keras_rnode.solvers.controller import (
    StepController,
    acceptable,
    positive_or_one,
    register_controller,
)

# keras is imported when used, so that the command line's help loads without it.

# The floor of r_(n-1): a step with (nearly) no error must not make the next
# one explode (Hairer's DOPRI5 code keeps the same floor).
_PREVIOUS_FLOOR = 1e-4


@register_controller
@dataclass(frozen=True)
class PIController(StepController):
    """The PI controller (module docstring): the integral controller plus the last error's trend.

    Args:
        pcoeff: the proportional gain (>= 0; 0 gives the integral controller).
        icoeff: the integral gain (> 0).
        safety, min_factor, max_factor: as `StepController`, as is the
            rule that a step may not grow right after a rejection.
        rtol, atol, error_norm (keywords): see `Controller`.

    A rejected attempt is resized by the integral rule, safety *
    r_n^(-1/k) (capped at 1), and does not enter the history; the first
    accepted step takes r_(n-1) = 1. Raises ValueError for a gain out of
    range (or as `StepController`).
    """

    pcoeff: float = 0.4
    icoeff: float = 0.3

    def __post_init__(self):
        super().__post_init__()
        self._store("pcoeff", checks.non_negative(self.pcoeff, "pcoeff"))
        self._store("icoeff", checks.positive_finite(self.icoeff, "icoeff"))

    def initial_state(self, dtype):
        """The integral controller's state and r_(n-1), the last accepted error norm."""
        from keras import ops

        return {**super().initial_state(dtype), "previous": ops.ones((), dtype)}

    def adapt(self, norm, state, order):
        """(accept, factor for the next step, new state); as `StepController.adapt`."""
        from keras import ops

        accept = acceptable(norm)
        r = positive_or_one(norm)
        pi = (self.safety * r ** (-(self.pcoeff + self.icoeff) / order)
              * state["previous"] ** (self.pcoeff / order))
        integral = self.safety * r ** (-1.0 / order)
        factor = self._bounded(ops.where(accept, pi, integral), norm, accept, state)
        previous = ops.where(accept, ops.maximum(norm, _PREVIOUS_FLOOR), state["previous"])
        return accept, factor, {"after_reject": ~accept, "previous": previous}
