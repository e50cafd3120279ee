"""Solver settings: one typed value that odeint, the CNF, the loops and the adjoint receive whole.

`SolverSettings` is validated once, when it is made; whoever holds one can
trust it. A new option is a new field here, named in FIELDS (and, to reach
the command line, an entry in the CLI's list of solver options): `odeint`
and `CNF` take the fields as keywords, the adjoint's backward solve
inherits every field of the forward one, and configs serialize the fields
generically. The fields that say how accurate a step must be (rtol, atol,
error_norm) are held by the step controller, which measures each step;
the settings take and give them by name all the same.
"""

import dataclasses
import functools
from dataclasses import dataclass

from keras_rnode import checks
from keras_rnode.solvers.controller import (
    ACCURACY_CHECKS,
    ACCURACY_DEFAULTS,
    ACCURACY_FIELDS,
    StepController,
    deserialize,
    missing_interface,
    serialize,
)
from keras_rnode.solvers.pi import PIController  # noqa: F401  (registered: configs name it)
from keras_rnode.solvers.tableaus import TABLEAUS

METHODS = tuple(sorted(TABLEAUS))
ADAPTIVE_METHODS = tuple(m for m in METHODS if TABLEAUS[m].adaptive)
FIXED_STEP_METHODS = tuple(m for m in METHODS if not TABLEAUS[m].adaptive)
GRADIENTS = ("adjoint", "direct", "none")


class SettingError(ValueError):
    """A bad setting, whose message can name the fields as its caller knows them.

    `describe(name)` writes the message, with `name(field)` for each field
    it mentions: str(err) names them plainly, `err.render(EVAL_PREFIX)` as
    CNF's evaluation solver does ("eval_rtol"), `err.render(flag)` with a
    function of the field as a command line does ("--eval-rtol").
    """

    def __init__(self, describe):
        self._describe = describe
        super().__init__(describe(lambda field: field))

    def render(self, name):
        """The message with each field named `name + field`, or `name(field)` if callable."""
        return self._describe(name if callable(name) else lambda field: name + field)


def _checked(check, value, field):
    """check(value, field), a shared argument check; its error as a SettingError."""
    try:
        return check(value, field)
    except ValueError:
        def describe(name):
            try:
                check(value, name(field))
            except ValueError as err:
                return str(err)
        raise SettingError(describe) from None


@dataclass(frozen=True, init=False)
class SolverSettings:
    """How to integrate: the method, its tolerances or step, its bounds and its gradient.

    Args:
        method: "dopri5" (adaptive Dormand-Prince 5(4), FSAL), or the
            fixed-step "rk4" and "euler".
        rtol, atol: tolerances of the adaptive method (positive, finite;
            default 1e-5).
        step_size: the step of a fixed-step method (required there, refused
            for dopri5, which chooses its own: see first_step).
        max_steps: bound on attempted steps; reaching it ends the solve with
            status "max_steps_reached", never a hang.
        gradient: "adjoint" (the adjoint ODE solved backwards: memory flat
            in the number of steps), "direct" (backpropagation through the
            accepted steps) or "none".
        first_step: dopri5's first step (default: Hairer's heuristic).
        controller: dopri5's step-size controller: a `StepController`
            (default), a `PIController`, or any object with the controller
            interface (keras_rnode/solvers/controller.py).
        error_norm: how a step's error is measured: "rms" over every
            controlled entry (default) or "per_sample", each sample's own,
            the step as good as the worst (keras_rnode/solvers/norms.py).

    rtol, atol and error_norm belong to the controller, which measures each
    step: given here they replace its own; not given, the controller's are
    kept (or the defaults where it leaves them None). `settings.rtol` reads
    the controller's. Raises `SettingError` (a ValueError) naming the field,
    the value and what is allowed.
    """

    method: str
    step_size: float | None
    max_steps: int
    gradient: str
    first_step: float | None
    controller: object

    def __init__(self, method="dopri5", rtol=None, atol=None, step_size=None, max_steps=1000,
                 gradient="adjoint", first_step=None, controller=None, error_norm=None):
        given = {"rtol": rtol, "atol": atol, "error_norm": error_norm}
        controller = StepController() if controller is None else controller
        missing = missing_interface(controller)
        if missing:
            raise SettingError(lambda name: (
                f"{name('controller')} must be a step controller (a StepController, a "
                f"PIController, or an object with the interface of "
                f"keras_rnode.solvers.Controller), got {controller!r}, which lacks {missing}"))
        accuracy = {}
        for field in ACCURACY_FIELDS:
            value = given[field] if given[field] is not None else getattr(controller, field)
            value = ACCURACY_DEFAULTS[field] if value is None else value
            accuracy[field] = _checked(ACCURACY_CHECKS[field], value, field)
        if any(getattr(controller, k) != v for k, v in accuracy.items()):
            controller = controller.replace(**accuracy)
        for field, value in (("method", method), ("step_size", step_size),
                             ("max_steps", max_steps), ("gradient", gradient),
                             ("first_step", first_step), ("controller", controller)):
            self._store(field, value)
        self._check()

    def _check(self):
        method, step_size = self.method, self.step_size
        _checked(functools.partial(checks.one_of, allowed=list(METHODS)), method, "method")
        _checked(functools.partial(checks.one_of, allowed=GRADIENTS), self.gradient, "gradient")
        self._store("max_steps", _checked(checks.integer, self.max_steps, "max_steps"))
        if self.adaptive and step_size is not None:
            raise SettingError(lambda name: (
                f"{name('step_size')} is for the fixed-step methods {list(FIXED_STEP_METHODS)}; "
                f"{method!r} chooses its own steps (use first_step), got "
                f"{name('step_size')}={step_size!r}"))
        if not self.adaptive and not (checks.is_real(step_size) and step_size > 0):
            raise SettingError(lambda name: (
                f"{name('step_size')} must be a positive finite number for the fixed-step "
                f"{name('method')} {method!r}, got {step_size!r}"))
        if step_size is not None:
            self._store("step_size", _checked(checks.positive_finite, step_size, "step_size"))
        if self.first_step is not None:
            self._store("first_step",
                        _checked(checks.positive_finite, self.first_step, "first_step"))

    def _store(self, field, value):
        object.__setattr__(self, field, value)  # frozen: the checked, plain-Python value

    @property
    def rtol(self):
        return self.controller.rtol

    @property
    def atol(self):
        return self.controller.atol

    @property
    def error_norm(self):
        return self.controller.error_norm

    @property
    def tableau(self):
        return TABLEAUS[self.method]

    @property
    def adaptive(self):
        return self.tableau.adaptive

    def replace(self, **changes):
        """A copy with `changes` (checked like a new value). A new controller that leaves
        rtol, atol or error_norm None takes these settings' values."""
        if "controller" in changes:
            for field in ACCURACY_FIELDS:
                if getattr(changes["controller"], field, None) is None:
                    changes.setdefault(field, getattr(self, field))
        return dataclasses.replace(self, **changes)

    def for_evaluation(self, **overrides):
        """The evaluation solver: these settings with the overrides that are not None.

        A fixed-step evaluation method without a step size takes the
        training step; an adaptive one drops it.
        """
        overrides = {k: v for k, v in overrides.items() if v is not None}
        method = overrides.get("method", self.method)
        if method in TABLEAUS and "step_size" not in overrides:
            overrides["step_size"] = None if TABLEAUS[method].adaptive else self.step_size
        return self.replace(**overrides)

    def describe(self):
        """A short label: "dopri5 rtol=1e-05 atol=1e-05" (then the error norm and controller
        where not the defaults) or "rk4 step=0.25"."""
        if not self.adaptive:
            return f"{self.method} step={self.step_size:g}"
        label = f"{self.method} rtol={self.rtol:g} atol={self.atol:g}"
        if self.error_norm != ACCURACY_DEFAULTS["error_norm"]:
            label += f" error_norm={self.error_norm}"
        if type(self.controller) is not StepController:
            label += f" {type(self.controller).__name__}"
        return label

    def to_config(self):
        """A JSON-able dict of the fields, rtol, atol and error_norm among them (the
        controller as {"class_name", "config"} of its other fields)."""
        config = {name: getattr(self, name) for name in FIELDS}
        config["controller"] = serialize(self.controller)
        return config

    @classmethod
    def from_config(cls, config):
        """Settings from `to_config`'s dict, or one saved before controllers had names (a
        "controller" dict of StepController's fields) or an error norm."""
        config = dict(config)
        if isinstance(config.get("controller"), dict):
            config["controller"] = deserialize(config["controller"])
        return cls(**config)


# The settings by name: what odeint and CNF take as keywords, configs hold
# and the command line's options are made from.
FIELDS = ("method", "rtol", "atol", "error_norm", "step_size", "max_steps", "gradient",
          "first_step", "controller")


# How the evaluation solver's fields are named beside the training solver's: CNF's
# keywords (eval_rtol), configs, TrainSettings' options, the command line (--eval-rtol).
EVAL_PREFIX = "eval_"
# Evaluation measures each sample's own error, so that a point's log-density does not
# depend on its batch-mates, at 1.00-1.14x the NFE of the batch RMS on the toys and the
# digits (benchmarks/RESULTS.md, "Per-sample error norm"); training keeps the RMS.
EVALUATION_ERROR_NORM = "per_sample"


def evaluation_solver(train, **overrides):
    """The evaluation solver of a training solver that names none of its own:
    `train.for_evaluation(**overrides)`, measuring errors per sample unless told."""
    if overrides.get("error_norm") is None:
        overrides["error_norm"] = EVALUATION_ERROR_NORM
    return train.for_evaluation(**overrides)


def split_options(options, prefix=""):
    """Pop the solver fields (named with `prefix`, e.g. EVAL_PREFIX) out of a keyword dict;
    returns them by field name."""
    return {name: options.pop(prefix + name) for name in FIELDS if prefix + name in options}


def flatten_pair(train, evaluation):
    """A training and an evaluation solver as one flat dict of fields, the evaluation
    solver's named with EVAL_PREFIX (as CNF's keywords and `rnode train`'s options)."""
    return {**train.to_config(),
            **{EVAL_PREFIX + k: v for k, v in evaluation.to_config().items()}}


def pop_pair(config):
    """(training, evaluation) SolverSettings popped out of a `flatten_pair` dict.

    The evaluation solver takes what it does not name from training: configs
    saved before it named every field of its own rely on that.
    """
    train = SolverSettings.from_config(split_options(config))
    evaluation = SolverSettings.from_config(
        {**train.to_config(), **split_options(config, EVAL_PREFIX)})
    return train, evaluation


def resolve(solver, options, caller="odeint"):
    """The SolverSettings of a call: `solver` (or the defaults), with keyword options replacing
    its fields. TypeError for an option that is not a field."""
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise TypeError(f"{caller} got unknown option(s) {unknown}; the solver settings are "
                        f"{list(FIELDS)}")
    if solver is None:
        return SolverSettings(**options)
    if not isinstance(solver, SolverSettings):
        raise ValueError(f"solver must be a SolverSettings, got {type(solver).__name__}")
    return solver.replace(**options) if options else solver
