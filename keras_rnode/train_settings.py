"""`TrainSettings`: everything `rnode train` is given, each option with the default it shows.

    import dataclasses, keras_rnode as kr
    from keras_rnode import runs

    settings = dataclasses.replace(kr.TrainSettings(), dataset="pinwheel", steps=2000)
    runs.train(settings)        # what `rnode train --dataset pinwheel --steps 2000` does

The command line takes its defaults from `TrainSettings()` and hands what
it parsed, option by option, to `from_command_line`. A value is checked
when it is made, and its errors name the options as the command line does
(--batch-size), so the command line only parses.

This module loads without keras: the command line's help shows these
defaults.
"""

import contextlib
import dataclasses
import os
from dataclasses import dataclass

from keras_rnode import checks, objectives, regularizers
from keras_rnode.actions import ACTIONS
from keras_rnode.datasets.registry import TOY_TRAIN_SIZE, check_dataset, dataset_name
from keras_rnode.layers.divergence import PROBES, TRACES, default_trace
from keras_rnode.models.conv_dynamics import CONV_DYNAMICS
from keras_rnode.models.factory import (
    ACTIVATIONS,
    ARCHITECTURES,
    architecture_for,
    default_activation,
    default_hidden,
)
from keras_rnode.solvers.settings import (
    EVAL_PREFIX,
    FIELDS,
    FIXED_STEP_METHODS,
    SettingError,
    SolverSettings,
    evaluation_solver,
    flatten_pair,
    pop_pair,
    split_options,
)

DEFAULT_EPOCHS = 10
# ...but never fewer steps than this: 10 epochs of the 1437 digits at batch 512 are 20.
DEFAULT_MIN_STEPS = 1000
# --jit's spellings, as TrainSettings.jit takes them: XLA, graph mode, or the backend's
# choice for the data (`backend.jit_by_default`).
JIT_CHOICES = {"auto": "auto", "on": True, "off": False}
ON_NAN = ("skip", "stop")
ON_NFE_LIMIT = ("warn", "stop")
# Options that only say how the trained model is scored: a resumed run may be given
# new ones (they change no trained weight), e.g. after an evaluation solve failed.
EVALUATION_OPTIONS = ("n_test", "eval_trace", "eval_batch_size",
                      *(EVAL_PREFIX + field for field in FIELDS))
# Penalty weights written as flat options before they went by name (options.json,
# config.json of older runs).
LEGACY_REGULARIZERS = ("kinetic", "jacobian")
# --objective's spellings; TrainSettings.objective holds the library's names.
OBJECTIVE_CHOICES = tuple(name.replace("_", "-") for name in objectives.OBJECTIVES)
# The options of flow matching alone: given with the likelihood objective, they would
# do nothing.
FLOW_MATCHING_OPTIONS = ("coupling", "sigma")
# Where config.json of older runs held the likelihood's metric under "objective".
LEGACY_OBJECTIVES = ("nll", "bpd")


class OptionConflict(ValueError):
    """Options that cannot go together, or that a resumed run may not change."""


def flag(name):
    """The command-line flag of an option: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


@contextlib.contextmanager
def named_as_flags(prefix=""):
    """A SettingError raised inside, as a ValueError naming the fields as flags
    (`prefix` EVAL_PREFIX: rtol is --eval-rtol)."""
    try:
        yield
    except SettingError as err:
        raise ValueError(err.render(lambda field: flag(prefix + field))) from None


def check_step_size(values, prefix=""):
    """A fixed-step method given without its step: refused, since unset it would silently
    take another (the training one, a run's)."""
    method = values.get("method")
    if method in FIXED_STEP_METHODS and values.get("step_size") is None:
        raise OptionConflict(f"{flag(prefix + 'method')} {method} needs "
                             f"{flag(prefix + 'step_size')}")


def parse_widths(text):
    """--hidden's '64,64,64' -> (64, 64, 64); None stays None. ValueError for anything else."""
    if text is None:
        return None
    try:
        widths = tuple(int(p) for p in text.split(","))
        if widths and min(widths) >= 1:
            return widths
    except ValueError:
        pass
    raise ValueError(f"--hidden must be comma-separated positive integers such as 64,64,64; "
                     f"got {text!r}")


def _optional(check, value, *args, **kwargs):
    return None if value is None else check(value, *args, **kwargs)


# `rnode train`'s default solver: backpropagation through the steps, faster than the
# adjoint (benchmarks/RESULTS.md); the evaluation solver differs where given, and
# in its error norm (`solvers.settings.evaluation_solver`).
_SOLVER = SolverSettings(gradient="direct")
_EVAL_SOLVER = evaluation_solver(_SOLVER)


@dataclass(frozen=True)
class TrainSettings:
    """What `rnode train` is given, each option by its name (--batch-size: batch_size).

    `regularizers`: penalty name -> weight (`keras_rnode.regularizers`);
    a weight of 0 is no penalty and is left out, so two settings that train
    the same model compare equal. `solver` and `eval_solver` are the
    training and evaluation solvers; on disk their fields are flat options
    of their own (method, eval_rtol, ...: see `to_options`). `jit` is True
    (XLA), False (graph mode) or "auto". `hidden=None` and the "auto" of
    `architecture`, `trace` and `jit` are decided by the data (`resolved`),
    that of `activation` by the objective (softplus, or SiLU for flow matching);
    `epochs=steps=None` is DEFAULT_EPOCHS, or as many as DEFAULT_MIN_STEPS
    steps take; `eval_trace=None` is as `trace`; `n_test=None` is the whole
    test split (TOY_TEST_SIZE toy points); `out=None` is runs/DATASET (`run_dir`).
    `objective` is "likelihood" or "flow_matching" ("flow-matching" is read
    as that), with flow matching's `coupling` and `sigma`
    (`training_objective`).
    Raises ValueError naming the option for a bad value, OptionConflict
    for options that cannot go together.
    """

    dataset: str = "8gaussians"
    hidden: tuple[int, ...] | None = None
    blocks: int = 1
    architecture: str = "auto"
    layer_type: str | None = None
    activation: str = "auto"
    regularizers: dict = dataclasses.field(
        default_factory=lambda: {"kinetic": 0.01, "jacobian": 0.01})
    objective: str = objectives.Likelihood.name
    coupling: str = "independent"
    sigma: float = 0.0
    solver: SolverSettings = _SOLVER
    eval_solver: SolverSettings = _EVAL_SOLVER
    trace: str = "auto"
    eval_trace: str | None = None
    noise: str = "gaussian"
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 512
    eval_batch_size: int = 500
    lr: float = 1e-3
    warmup_steps: int = 0
    seed: int = 0
    n_train: int = TOY_TRAIN_SIZE
    n_test: int | None = None
    logit_alpha: float = 1e-6
    devices: int = 1
    workers: bool = False
    jit: bool | str = "auto"
    out: str | None = None
    overwrite: bool = False
    quiet: bool = False
    checkpoint_every: int = 200
    resume: bool = False
    on_nan: str = "stop"
    on_max_steps: str = "warn"
    nfe_limit: int | None = None
    on_nfe_limit: str = "warn"

    def __post_init__(self):
        self._check_values()
        if self.epochs and self.steps:
            raise OptionConflict("give --epochs or --steps, not both")
        if self.workers and self.devices != 1:
            raise OptionConflict("give --workers or --devices, not both: each worker trains "
                                 "on all its GPUs, or its CPU")
        if self.batch_size % self.devices:
            raise OptionConflict(f"--batch-size {self.batch_size} must be divisible by "
                                 f"--devices {self.devices}: each device takes an equal share")
        if self.noise == "rademacher" and "exact" in (self.trace, self.eval_trace):
            raise OptionConflict("--noise rademacher needs --trace hutchinson")
        check_objective_options(self.objective, {
            name: getattr(self, name) for name in FLOW_MATCHING_OPTIONS
            if getattr(self, name) != getattr(TrainSettings, name)})

    def _check_values(self):
        """Each value checked, and stored (frozen) in its plain Python form."""
        minimums = {"blocks": 1, "batch_size": 1, "eval_batch_size": 1, "n_train": 1,
                    "devices": 1, "warmup_steps": 0, "seed": 0, "checkpoint_every": 0}
        for name, minimum in minimums.items():
            self._store(name, checks.integer(getattr(self, name), flag(name), minimum))
        for name in ("epochs", "steps", "n_test", "nfe_limit"):
            self._store(name, _optional(checks.integer, getattr(self, name), flag(name)))
        self._store("dataset", check_dataset(self.dataset))
        self._store("hidden", _optional(checks.positive_ints, self.hidden, "--hidden"))
        self._store("lr", checks.positive_finite(self.lr, "--lr"))
        alpha = self.logit_alpha
        if not (checks.is_real(alpha) and 0 < alpha < 0.5):
            raise ValueError(f"--logit-alpha must be a number in (0, 0.5), got {alpha!r}")
        self._store("logit_alpha", float(alpha))
        # Zero weights left out: the model integrates only penalties of weight > 0.
        self._store("regularizers", {name: weight for name, weight in
                                     regularizers.weights(self.regularizers).items() if weight})
        choices = {"architecture": ARCHITECTURES, "activation": ACTIVATIONS,
                   "trace": ("auto", *TRACES), "noise": PROBES,
                   "on_nan": ON_NAN, "on_max_steps": ACTIONS, "on_nfe_limit": ON_NFE_LIMIT}
        for name, allowed in choices.items():
            checks.one_of(getattr(self, name), flag(name), allowed)
        _optional(checks.one_of, self.eval_trace, "--eval-trace", TRACES)
        if self.objective not in (*objectives.OBJECTIVES, *OBJECTIVE_CHOICES):
            checks.one_of(self.objective, "--objective", OBJECTIVE_CHOICES)  # its error
        self._store("objective", self.objective.replace("-", "_"))
        checks.one_of(self.coupling, "--coupling", objectives.COUPLINGS)
        self._store("sigma", checks.non_negative(self.sigma, "--sigma"))
        _optional(checks.one_of, self.layer_type, "--layer-type", sorted(CONV_DYNAMICS))
        for name in ("solver", "eval_solver"):
            if not isinstance(getattr(self, name), SolverSettings):
                raise ValueError(f"{name} must be a SolverSettings, got "
                                 f"{type(getattr(self, name)).__name__}")
        if self.jit not in JIT_CHOICES.values():
            raise ValueError(f"jit must be True, False or 'auto', got {self.jit!r}")

    def _store(self, name, value):
        object.__setattr__(self, name, value)

    @property
    def name(self):
        """The data set's name as a person reads it."""
        return dataset_name(self.dataset)

    @property
    def run_dir(self):
        return self.out or os.path.join("runs", os.path.splitext(self.name)[0])

    @property
    def training_objective(self):
        """The objective training minimizes, as `keras_rnode.objectives` has it."""
        if self.objective == objectives.FlowMatching.name:
            return objectives.FlowMatching(coupling=self.coupling, sigma=self.sigma)
        return objectives.get(self.objective)

    @property
    def solves_in_training(self):
        """True where a training step solves the flow (the likelihood; flow matching
        regresses on a path with no solve): only then are its solves watched."""
        return self.objective == objectives.Likelihood.name

    @property
    def host_assignment(self):
        """True where a training step calls the host: the OT coupling's assignment."""
        return self.objective == objectives.FlowMatching.name and self.coupling == "ot"

    @property
    def network_activation(self):
        """The activation of the dynamics these settings build: "auto" by the objective."""
        return (default_activation(self.objective) if self.activation == "auto"
                else self.activation)

    def resolved(self, event_shape):
        """These settings with what the data decides: the architecture, trace and jit for
        "auto", default widths."""
        architecture = (architecture_for(event_shape) if self.architecture == "auto"
                        else self.architecture)
        if architecture == "dense" and self.layer_type:
            raise OptionConflict("--layer-type names conv dynamics; --architecture dense has "
                                 "dense ones")
        if architecture == "multiscale" and self.objective != objectives.Likelihood.name:
            raise OptionConflict(
                "--objective flow-matching regresses one velocity field from the data to the "
                "noise; the multiscale model squeezes and factors out channels between its "
                "blocks, so no such path runs through it: give --architecture single or "
                "dense, or train by --objective likelihood")
        trace = default_trace(event_shape) if self.trace == "auto" else self.trace
        conv = len(event_shape) == 3 and architecture != "dense"
        jit = _jit_by_default(conv, self.host_assignment) if self.jit == "auto" else self.jit
        return dataclasses.replace(self, architecture=architecture, trace=trace,
                                   activation=self.network_activation,
                                   eval_trace=self.eval_trace or trace, jit=jit,
                                   hidden=self.hidden or default_hidden(architecture,
                                                                        event_shape))

    def to_options(self):
        """A flat, JSON-able dict: every option by name, each solver field as one of its own
        (the evaluation solver's with EVAL_PREFIX); config.json and options.json hold it."""
        options = flatten_pair(self.solver, self.eval_solver)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, SolverSettings):
                options[field.name] = list(value) if isinstance(value, tuple) else value
        return options

    def command_line(self):
        """`to_options` with the penalty weights as the command line gives them: one option
        per built-in penalty (0 where there is none)."""
        options = self.to_options()
        weights = options.pop("regularizers")
        return {**options, **{name: weights.get(name, 0.0) for name in regularizers.BUILTINS}}

    @classmethod
    def from_options(cls, options):
        """Settings from `to_options`'s dict; unknown keys (derived values) are left out, and
        the flat penalty weights of older runs are read as `regularizers`."""
        options = dict(options)
        solver, eval_solver = pop_pair(options)
        legacy = {k: options.pop(k) for k in LEGACY_REGULARIZERS if k in options}
        if "regularizers" not in options and legacy:
            options["regularizers"] = legacy
        if options.get("objective") in LEGACY_OBJECTIVES:  # a metric, of a likelihood run
            options.pop("objective")
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(solver=solver, eval_solver=eval_solver,
                   **{k: v for k, v in options.items() if k in names})

    @classmethod
    def from_command_line(cls, options, given=()):
        """The settings of `rnode train`'s options, as click names them: every field by name
        but the solvers' (method, eval_rtol, ...) and the penalty weights (kinetic, ...),
        each an option of its own, and `jit` spelled "auto", "on" or "off", with the flag
        `no_jit`. `given`: the names given on the command line (--jit with --no-jit is a
        conflict, as are --coupling or --sigma with --objective likelihood)."""
        options = spelled_out(options, given)
        check_objective_options(options.get("objective", cls.objective),
                                {name: options[name] for name in FLOW_MATCHING_OPTIONS
                                 if name in given})
        weights = {name: checks.non_negative(options.pop(name), flag(name))
                   for name in regularizers.BUILTINS if name in options}
        train = {name: options.pop(name) for name in FIELDS if name in options}
        evaluation = split_options(options, EVAL_PREFIX)
        check_step_size(train)
        check_step_size(evaluation, EVAL_PREFIX)
        with named_as_flags():
            solver = SolverSettings(**train)
        with named_as_flags(EVAL_PREFIX):
            eval_solver = solver.replace(**evaluation)
        return cls(solver=solver, eval_solver=eval_solver, regularizers=weights, **options)


def check_objective_options(objective, given):
    """OptionConflict for flow matching's options (`given`: {name: value}) with the
    likelihood objective, where they would do nothing."""
    if objective == objectives.Likelihood.name and given:
        shown = " and ".join(f"{flag(name)} {value}" for name, value in given.items())
        raise OptionConflict(f"{shown} only mean{'s' * (len(given) == 1)} something with "
                             "--objective flow-matching")


def spelled_out(options, given=()):
    """The command line's options with --jit's spelling (and --no-jit) as `jit` takes it,
    and --objective's as `objective` does."""
    options = dict(options)
    if isinstance(options.get("objective"), str):
        options["objective"] = options["objective"].replace("-", "_")
    if options.pop("no_jit", False):
        if "jit" in given:
            raise OptionConflict("give --jit or --no-jit, not both")
        options["jit"] = "off"
    if "jit" in options:
        options["jit"] = JIT_CHOICES[options["jit"]]
    return options


def _jit_by_default(conv, host_call=False):
    """`backend.jit_by_default`, but never XLA for a step that calls the host where XLA
    cannot compile that (TensorFlow's numpy_function)."""
    from keras_rnode import backend  # loads keras: not at the command line's start

    return backend.jit_by_default(conv) and (backend.HOST_CALLS_COMPILE or not host_call)
