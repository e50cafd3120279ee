"""Step-size control of the adaptive solver: the controller interface and the integral controller.

A controller decides, for the adaptive loop, everything about the step
size: the first step, the error norm of each attempt (with its own
tolerances), whether to accept it and by how much to scale the next.
The loop only asks. Any object with this interface is a controller
(subclass `Controller` to get the shared pieces):

    rtol, atol, error_norm        its tolerances and error norm ("rms" or
                                  "per_sample", see norms.py); None: as the
                                  SolverSettings holding it say
    replace(**changes)            a copy with fields changed, checked again
    initial_state(dtype)          a dict of scalar tensors the loop carries
                                  between attempts for it (its memory);
                                  dtype: the states' floating dtype
    initial_step(func, t0, y0, f0, direction, length, order, controlled)
                                  the first step's size, a positive scalar
                                  tensor at most `length` (= |t1 - t0|);
                                  func(t, y) -> dy/dt on lists of tensors,
                                  f0 = func(t0, y0), direction +-1, order
                                  the method's, controlled one bool a state
    norm(error, y0, y1, controlled)
                                  a scalar tensor of y's dtype: the attempt's
                                  error (lists: the embedded estimate, the
                                  states before and after) in units of the
                                  tolerance; at most 1 is good enough
    adapt(norm, state, order)     (accept: a scalar bool tensor, the factor
                                  of the next step: a scalar, new state)
    get_config(), from_config(config) (a classmethod)
                                  its fields as a JSON-able dict, and back

It must be hashable (frozen): settings compare and caches key by it. To be
saved with a model its class must be registered (`register_controller`):
a controller is stored as its registered name and its fields.
"""

import dataclasses
import functools
import json
from dataclasses import KW_ONLY, dataclass

from keras_rnode import checks
from keras_rnode.solvers import norms

# keras is imported when used, so that the command line's help loads without it.

# The fields that say how accurate a step must be: a controller's, and
# SolverSettings takes them by name too (rtol=..., the command line's --rtol).
ACCURACY_FIELDS = ("rtol", "atol", "error_norm")
ACCURACY_DEFAULTS = {"rtol": 1e-5, "atol": 1e-5, "error_norm": "rms"}
ACCURACY_CHECKS = {"rtol": checks.positive_finite, "atol": checks.positive_finite,
                   "error_norm": functools.partial(checks.one_of, allowed=norms.ERROR_NORMS)}
INTERFACE = ("replace", "initial_state", "initial_step", "norm", "adapt", "get_config",
             *ACCURACY_FIELDS)


def _smallest(values, bound):
    """min(min(values), bound): no reduction of an empty vector."""
    from keras import ops

    return ops.min(ops.concatenate([values, ops.reshape(bound, (1,))]))


@dataclass(frozen=True)
class Controller:
    """The base of a step controller: its tolerances, its error norm and Hairer's first step.

    A subclass (a frozen dataclass, registered to be saved) adds its own
    fields and `initial_state` and `adapt`; see the module docstring for
    the interface. Raises ValueError for a tolerance that is not a positive
    finite number or an error norm not in ("rms", "per_sample").
    """

    _: KW_ONLY
    rtol: float | None = None
    atol: float | None = None
    error_norm: str | None = None

    def __post_init__(self):
        for name in ACCURACY_FIELDS:
            if getattr(self, name) is not None:
                self._store(name, ACCURACY_CHECKS[name](getattr(self, name), name))

    def _store(self, field, value):
        object.__setattr__(self, field, value)  # frozen: the checked, plain-Python value

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def get_config(self):
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def norm(self, error, y0, y1, controlled):
        """The worst of `norms` of err / (atol + rtol * max(|y0|, |y1|)) over the controlled
        states (HNW I, II.4, eq. (4.11)): the RMS over all, or of the worst sample."""
        def pick(values):
            return norms.controlled(values, controlled)

        scales = norms.scales(pick(y0), pick(y1), self.rtol, self.atol)
        return norms.worst(norms.norms(pick(error), scales, self.error_norm))

    def initial_step(self, func, t0, y0, f0, direction, length, order, controlled):
        """Hairer, Norsett & Wanner's starting step (Solving ODEs I, Section II.4).

        Costs one evaluation of func besides f0. With error_norm="per_sample"
        each sample proposes its own and the smallest is taken. Returns a
        positive magnitude, at most `length`.
        """
        from keras import ops

        def pick(values):
            return norms.controlled(values, controlled)

        scales = [self.atol + self.rtol * ops.abs(y) for y in pick(y0)]

        def rms(values):
            return norms.norms(values, scales, self.error_norm)

        d0, d1 = rms(pick(y0)), rms(pick(f0))
        small = (d0 < 1e-5) | (d1 < 1e-5)
        h0 = _smallest(ops.where(small, 1e-6, 0.01 * d0 / ops.where(small, 1.0, d1)), length)
        y1 = [y + direction * h0 * f for y, f in zip(y0, f0)]
        f1 = func(t0 + direction * h0, y1)
        d2 = rms([a - b for a, b in zip(pick(f1), pick(f0))]) / h0
        dmax = ops.maximum(d1, d2)
        flat = dmax <= 1e-15
        h1 = ops.where(flat, ops.maximum(1e-6, h0 * 1e-3),
                       (0.01 / ops.where(flat, 1.0, dmax)) ** (1.0 / order))
        return _smallest(ops.minimum(100.0 * h0, h1), length)


@dataclass(frozen=True)
class StepController(Controller):
    """The standard (integral) controller: h_next = h * clip(safety * norm^(-1/order)).

    (Hairer, Norsett & Wanner, Solving ODEs I, Section II.4; scipy's RK45.)

    Args:
        safety: the factor below the optimal step (Hairer; scipy: 0.9).
        min_factor, max_factor: bounds on the step's change per attempt.
        rtol, atol, error_norm (keywords): see `Controller`.

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
        super().__post_init__()
        for name in ("safety", "min_factor", "max_factor"):
            self._store(name, checks.positive_finite(getattr(self, name), name))
        if self.safety > 1 or self.min_factor > 1 or self.max_factor < 1:
            raise ValueError(f"the step controller needs 0 < safety <= 1 and 0 < min_factor "
                             f"<= 1 <= max_factor, got {self}")

    def initial_state(self, dtype):
        """What the loop carries for it: whether the last attempt was rejected."""
        from keras import ops

        return {"after_reject": ops.zeros((), "bool")}

    def adapt(self, norm, state, order):
        """(accept, factor for the next step, new state) from this attempt's error norm.

        A NaN or inf norm rejects and shrinks by min_factor; a zero norm
        grows by max_factor.
        """
        accept = acceptable(norm)
        factor = self._bounded(self.safety * positive_or_one(norm) ** (-1.0 / order), norm,
                               accept, state)
        return accept, factor, {"after_reject": ~accept}

    def _bounded(self, factor, norm, accept, state):
        """factor within [min_factor, max_factor] (these for a non-finite or zero norm),
        and at most 1 unless an accepted attempt follows an accepted one."""
        from keras import ops

        finite = ops.isfinite(norm)
        factor = ops.where(norm == 0, self.max_factor, factor)
        factor = ops.where(finite, factor, self.min_factor)
        factor = ops.clip(factor, self.min_factor, self.max_factor)
        return ops.where(accept & ~state["after_reject"], factor, ops.minimum(factor, 1.0))


def acceptable(norm):
    """Whether an attempt of this error norm is accepted: finite and at most 1."""
    from keras import ops

    return ops.isfinite(norm) & (norm <= 1.0)


def positive_or_one(norm):
    """norm where it is positive and finite, else 1 (a power of it is then harmless)."""
    from keras import ops

    return ops.where(ops.isfinite(norm) & (norm > 0), norm, ops.ones_like(norm))


# ------------------------------------------------------------ serialization --

_REGISTRY = {}


def register_controller(cls=None, *, name=None):
    """Register a controller class under `name` (default: its class name) so that settings
    holding one can be saved and loaded; returns cls (a decorator, with or without name=).

    Registering a name again replaces its class.
    """
    if cls is None:
        return lambda c: register_controller(c, name=name)
    _REGISTRY[name or cls.__name__] = cls
    return cls


register_controller(StepController)


def missing_interface(controller):
    """The names of the controller interface that `controller` lacks (none: a controller)."""
    return [name for name in INTERFACE if not hasattr(controller, name)]


def serialize(controller):
    """{"class_name": its registered name, "config": its fields but the accuracy ones}.

    The accuracy fields (rtol, atol, error_norm) are left to the settings
    holding it, which store them flat. Raises ValueError for a class not
    registered or a config that is not JSON-able.
    """
    names = [n for n, c in _REGISTRY.items() if c is type(controller)]
    if not names:
        raise ValueError(
            f"the step controller {type(controller).__name__} is not registered, so it cannot "
            f"be saved; register its class with "
            f"keras_rnode.solvers.register_controller({type(controller).__name__})")
    config = {k: v for k, v in controller.get_config().items() if k not in ACCURACY_FIELDS}
    try:
        json.dumps(config)
    except TypeError as err:
        raise ValueError(f"the step controller {names[0]}'s get_config() must be JSON-able "
                         f"to be saved: {err}") from None
    return {"class_name": names[0], "config": config}


def deserialize(config):
    """The controller of a `serialize` dict; a dict without "class_name" (configs saved before
    controllers were named) holds the fields of a StepController. ValueError for a name not
    registered."""
    if "class_name" not in config:
        return StepController(**config)
    name = config["class_name"]
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown step controller {name!r}; the registered ones are {list(_REGISTRY)}. A "
            f"controller of your own must be registered "
            f"(keras_rnode.solvers.register_controller) before settings holding it are loaded")
    return _REGISTRY[name].from_config(config["config"])
