"""A training run: its settings, its directory, the resume rules, and training it.

A run directory, which `train` fills, holds

    model.keras    the trained model (keras.saving.load_model)
    config.json    every option of the run, and what was derived from them
    metrics.json   final training metrics, held-out nll or bits/dim, NFE, times
    history.json   the per-epoch training metrics
    density.png    2-D data: the data beside the learned density
    samples.png    images: a grid of samples
    checkpoint/    while the run is unfinished: its options and its last checkpoint

`TrainSettings` are `rnode train`'s options by name, so errors here name
them as the command line does (--epochs); the CLI only parses them.
"""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass

from keras_rnode import __version__, checks
from keras_rnode.datasets.registry import check_dataset, dataset_name, load_data, load_npy
from keras_rnode.datasets.toy import TOY_NAMES, toy_entropy
from keras_rnode.layers.divergence import default_trace
from keras_rnode.models.factory import architecture_for, build_model, default_hidden
from keras_rnode.plots import plot_density, save_samples
from keras_rnode.solvers.settings import SolverSettings, flatten_pair, pop_pair

# keras, and the modules that load it, are imported when used, so that the
# command line's help loads without it.

MODEL_FILE = "model.keras"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"
DENSITY_FILE = "density.png"
SAMPLES_FILE = "samples.png"
CHECKPOINT_DIR = "checkpoint"
OPTIONS_FILE = "options.json"
DEFAULT_EPOCHS = 10
# ...but never fewer steps than this: 10 epochs of the 1437 digits at batch 512 are 20.
DEFAULT_MIN_STEPS = 1000
# --jit's choices, as TrainSettings.jit takes them: XLA, graph mode, or the backend's
# choice for the data (`backend.jit_by_default`).
JIT_CHOICES = {"auto": "auto", "on": True, "off": False}
# Options a resumed run may change: what to do on trouble, and how it shows.
RESUME_MAY_CHANGE = ("resume", "out", "quiet", "overwrite", "checkpoint_every", "on_nan",
                     "on_max_steps", "nfe_limit", "on_nfe_limit")


class OptionConflict(ValueError):
    """Options that cannot go together, or that a resumed run may not change."""


class RunFailed(RuntimeError):
    """A run that cannot go on (a watch stopped it, no devices); the message says what to do."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C while training; the message says how to resume."""


# ---------------------------------------------------------------- settings --


@dataclass(frozen=True)
class TrainSettings:
    """What `rnode train` is given, each option by its name (--batch-size: batch_size).

    `solver` and `eval_solver` are the training and evaluation solvers;
    on disk their fields are flat options of their own (method, eval_rtol,
    ...: see `to_options`). `jit` is True (XLA), False (graph mode) or
    "auto". `hidden=None` and the "auto" of `architecture`, `trace` and
    `jit` are decided by the data (`resolved`); `epochs=steps=None` is
    `default_epochs`; `eval_trace=None` is as `trace`; `out=None` is
    runs/DATASET (`run_dir`). Raises OptionConflict for options that cannot
    go together.
    """

    dataset: str
    hidden: tuple[int, ...] | None
    blocks: int
    architecture: str
    layer_type: str | None
    kinetic: float
    jacobian: float
    solver: SolverSettings
    eval_solver: SolverSettings
    trace: str
    eval_trace: str | None
    noise: str
    epochs: int | None
    steps: int | None
    batch_size: int
    eval_batch_size: int
    lr: float
    warmup_steps: int
    seed: int
    n_train: int
    n_test: int | None
    logit_alpha: float
    devices: int
    jit: bool | str
    out: str | None
    overwrite: bool
    quiet: bool
    checkpoint_every: int
    resume: bool
    on_nan: str
    on_max_steps: str
    nfe_limit: int | None
    on_nfe_limit: str
    workers: bool = False

    def __post_init__(self):
        if self.hidden is not None:  # frozen: stored once, as the checked tuple
            object.__setattr__(self, "hidden", checks.positive_ints(self.hidden, "--hidden"))
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
        if self.jit not in JIT_CHOICES.values():
            raise ValueError(f"jit must be True, False or 'auto', got {self.jit!r}")

    @property
    def name(self):
        """The data set's name as a person reads it."""
        return dataset_name(self.dataset)

    @property
    def run_dir(self):
        return self.out or os.path.join("runs", os.path.splitext(self.name)[0])

    def resolved(self, event_shape):
        """These settings with what the data decides: the architecture, trace and jit for
        "auto", default widths."""
        architecture = (architecture_for(event_shape) if self.architecture == "auto"
                        else self.architecture)
        if architecture == "dense" and self.layer_type:
            raise OptionConflict("--layer-type names conv dynamics; --architecture dense has "
                                 "dense ones")
        trace = default_trace(event_shape) if self.trace == "auto" else self.trace
        conv = len(event_shape) == 3 and architecture != "dense"
        jit = _jit_by_default(conv) if self.jit == "auto" else self.jit
        return dataclasses.replace(self, architecture=architecture, trace=trace,
                                   eval_trace=self.eval_trace or trace, jit=jit,
                                   hidden=self.hidden or default_hidden(architecture,
                                                                        event_shape))

    def to_options(self):
        """A flat, JSON-able dict: every option by name, each solver field as one of its own
        (the evaluation solver's with "eval_"); config.json and options.json hold it."""
        options = flatten_pair(self.solver, self.eval_solver)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, SolverSettings):
                options[field.name] = list(value) if isinstance(value, tuple) else value
        return options

    @classmethod
    def from_options(cls, options):
        """Settings from `to_options`'s dict; unknown keys (derived values) are left out."""
        options = dict(options)
        solver, eval_solver = pop_pair(options)
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(solver=solver, eval_solver=eval_solver,
                   **{k: v for k, v in options.items() if k in names})


def _jit_by_default(conv):
    from keras_rnode import backend  # loads keras: not at the command line's start

    return backend.jit_by_default(conv)


def resumed_settings(options, given):
    """The interrupted run in options["out"], continued: its own settings, but for the few
    a resume may change (RESUME_MAY_CHANGE), which come from `options`.

    `options`: the flat options of the command (as `to_options` names them);
    `given`: the names among them given on the command line, which must agree
    with the run's.
    """
    if not options["out"]:
        raise OptionConflict("--resume needs --out RUN_DIR, the run to continue")
    path = os.path.join(options["out"], CHECKPOINT_DIR, OPTIONS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"nothing to resume: {path} does not exist")
    with open(path) as f:
        saved = json.load(f)
    for key, value in options.items():
        value = list(value) if isinstance(value, tuple) else value
        if key in given and key not in RESUME_MAY_CHANGE and saved.get(key) != value:
            flag = "--" + key.replace("_", "-")
            raise OptionConflict(f"--resume continues the run with its own options; "
                                 f"{flag} was {saved.get(key)!r}, drop {flag}")
    return dataclasses.replace(TrainSettings.from_options(saved),
                               **{k: options[k] for k in RESUME_MAY_CHANGE})


def resume_hint(out):
    """How to continue the run in `out`, for a message."""
    from keras_rnode import callbacks

    step = callbacks.StepBackup.resume_step(os.path.join(out, CHECKPOINT_DIR))
    if step is None:
        return (f"no checkpoint was saved yet (--checkpoint-every); `rnode train --resume "
                f"--out {out}` starts the run again with its options")
    return f"`rnode train --resume --out {out}` continues from the checkpoint at step {step}"


# ----------------------------------------------------------- run directory --


def check_run_dir(settings):
    """Refuse to write over a model or an interrupted run unless the settings say so."""
    from keras_rnode import callbacks

    out = settings.run_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"--out {out} is a file, not a run directory")
    checkpoint = os.path.join(out, CHECKPOINT_DIR)
    if settings.resume or settings.overwrite:
        return
    # The options file is written as a run starts and removed when it ends well.
    if os.path.isfile(os.path.join(checkpoint, OPTIONS_FILE)):
        step = callbacks.StepBackup.resume_step(checkpoint) or 0
        raise FileExistsError(f"{out} holds an interrupted run (checkpoint at step {step}); "
                              "pass --resume to continue it or --overwrite to start over")
    if os.path.exists(os.path.join(out, MODEL_FILE)):
        raise FileExistsError(f"{out} already holds a model; pass --overwrite to replace it, "
                              "or choose another --out")


def write_json(obj, path):
    """Write obj as JSON through a temporary file: a killed write leaves the old file."""
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
        f.write("\n")
    os.replace(tmp, path)


def load_model(path):
    """A saved RNODE from a run directory or a .keras file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, MODEL_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {MODEL_FILE} in {os.path.dirname(path)}: not a run "
                                    "directory (create one with `rnode train --out DIR`)")
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    import keras

    import keras_rnode.models.multiscale  # noqa: F401 - registers the classes a model holds

    return keras.saving.load_model(path, compile=False)


def load_config(run_dir):
    """A run directory's config.json as a dict; {} where there is none."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _save_model(model, out):
    os.makedirs(out, exist_ok=True)
    partial = os.path.join(out, ".partial." + MODEL_FILE)
    model.save(partial)
    os.replace(partial, os.path.join(out, MODEL_FILE))


def write_figure(model, x_test, out, batch_size, seed):
    """density.png for 2-D data, samples.png for images; drop the other if a run left it."""
    import keras

    event_shape = tuple(model.event_shape)
    figure = None
    if event_shape == (2,):
        figure = DENSITY_FILE
        plot_density(model, x_test, os.path.join(out, figure), batch_size)
    elif len(event_shape) == 3:
        figure = SAMPLES_FILE
        samples = keras.ops.convert_to_numpy(model.sample(36, seed=seed))
        save_samples(samples, os.path.join(out, figure), model.levels)
    for stale in {DENSITY_FILE, SAMPLES_FILE} - {figure}:
        if os.path.exists(os.path.join(out, stale)):
            os.remove(os.path.join(out, stale))


# -------------------------------------------------------------- evaluation --


def held_out_quality(model, x, name, batch_size):
    """`evaluate_model` on x, with a toy's entropy (the floor of its nll) beside it."""
    from keras_rnode.evaluation import evaluate_model

    result = evaluate_model(model, x, batch_size)
    if name in TOY_NAMES:
        result["entropy"] = toy_entropy(name)
    return result


def choose_evaluation(model, trace=None, probes=None, **solver):
    """Evaluate `model` with this trace, these Hutchinson probes per sample and these fields
    of its evaluation solver (method, rtol, atol, step_size); None keeps the model's own.

    A new method is taken as `SolverSettings.for_evaluation` takes it: an
    adaptive one drops the step size, a fixed-step one keeps the step unless
    given one. Raises SettingError for a bad solver field, ValueError for a
    bad trace or count, OptionConflict for probes the exact trace cannot use.
    """
    given = {k: v for k, v in solver.items() if v is not None}
    if given:
        for block in model.blocks:
            block.eval_solver = block.eval_solver.for_evaluation(**given)
    model.set_evaluation(trace=trace, probes=probes)
    exact = all(b.evaluation_trace(model.event_shape) == "exact" for b in model.blocks)
    if probes and probes > 1 and exact:
        raise OptionConflict("--probes counts Hutchinson probes, and this run evaluates with "
                             "the exact trace; add --trace hutchinson")


def evaluation_data(config, dataset=None, n_test=None):
    """(x, name) that `rnode evaluate` scores: the run's test split unless told otherwise.

    `config`: the run's config.json. Another .npy file than the run's is
    held out whole.
    """
    if dataset is None:
        dataset = config.get("dataset")
        if dataset is None:
            raise OptionConflict("this run has no config.json; pass --dataset")
        n_test = n_test or config.get("n_test")
    else:
        dataset = check_dataset(dataset)
    if dataset.endswith(".npy") and dataset != config.get("dataset"):
        x = load_npy(dataset)
        x = x[:n_test] if n_test else x
    else:
        x, _ = load_data(dataset, "test", n_test, seed=config.get("seed", 0))
    return x, dataset_name(dataset)


# ---------------------------------------------------------------- training --


@dataclass(frozen=True)
class RunReport:
    """A finished run: where it is, its data set's name, its held-out result, training time."""

    out: str
    name: str
    test: dict
    train_seconds: float


def train(settings, note=print):
    """Train the run `settings` describe, evaluate it, and fill its run directory.

    `note(text)` tells of a setting the machine changes (jit off across
    logical CPU devices). Raises RunFailed when a watch stopped training
    (the model is saved with its last good weights, the checkpoint kept)
    and RunInterrupted on Ctrl-C; both messages say how to resume.

    With `workers` (TF_CONFIG names the cluster) every worker trains; the
    chief writes the run directory, the others do the same work, into a
    scratch directory of their own that is removed at the end (on a resume
    they start from a copy of the chief's checkpoint, which --out must
    reach). A worker that dies fails the others' run with RunFailed.
    """
    from keras_rnode.backend.distribute import is_chief, lost_worker

    if not settings.workers:
        return _train(settings, note)
    scratch = None
    if not is_chief():
        import tempfile

        scratch = tempfile.mkdtemp(prefix="rnode-worker-")
        if settings.resume:
            shutil.copytree(os.path.join(settings.run_dir, CHECKPOINT_DIR),
                            os.path.join(scratch, CHECKPOINT_DIR))
    try:
        report = _train(settings if scratch is None else dataclasses.replace(
            settings, out=scratch, overwrite=True), note)
    except Exception as err:
        message = lost_worker(err, hint=f"Start every worker again with `rnode train --resume "
                                        f"--workers --out {settings.run_dir}` to continue from "
                                        "the last checkpoint.")
        if message is None:
            raise
        raise RunFailed(message) from None
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return dataclasses.replace(report, out=settings.run_dir)


def _train(settings, note):
    import keras

    from keras_rnode.backend.distribute import supports_jit
    from keras_rnode.backend.graph_options import avoid_addn_rewrite_race

    start = time.perf_counter()
    settings = dataclasses.replace(settings, out=settings.run_dir)
    check_run_dir(settings)
    # Devices must be set up before TensorFlow does any work.
    strategy = _strategy(settings)
    toy = settings.dataset in TOY_NAMES
    x_train, levels = load_data(settings.dataset, "train", settings.n_train if toy else None,
                                seed=settings.seed)
    x_test, _ = load_data(settings.dataset, "test", settings.n_test, seed=settings.seed)
    run = settings.resolved(tuple(x_train.shape[1:]))
    if strategy is not None and run.jit and not supports_jit(strategy):
        if settings.jit is True:
            note("note: XLA cannot compile one step across logical CPU devices; training in "
                 "graph mode (--no-jit)")
        run = dataclasses.replace(run, jit=False)
    if levels and not run.jit:
        avoid_addn_rewrite_race()  # see there: a TensorFlow race in graph-mode image steps
    keras.utils.set_random_seed(settings.seed)
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = compiled_model(run, tuple(x_train.shape[1:]), levels)

    # The options as given, not as resolved: a resume resolves them again.
    _start_checkpoint(settings)
    fit_start = time.perf_counter()
    history, resumed, stop = _fit(model, x_train, run)
    train_seconds = time.perf_counter() - fit_start
    history = {k: [float(v) for v in vs] for k, vs in history.items()}
    last = {k: vs[-1] for k, vs in history.items() if vs}
    out = run.out
    _save_model(model, out)
    if stop is not None:
        write_json({"stopped": stop, "resumed_from_step": resumed, "train": last},
                   os.path.join(out, METRICS_FILE))
        write_json(history, os.path.join(out, HISTORY_FILE))
        raise RunFailed(f"training stopped: {stop}. {out}/{MODEL_FILE} holds the last good "
                        f"weights; {resume_hint(out)}")
    shutil.rmtree(os.path.join(out, CHECKPOINT_DIR), ignore_errors=True)

    result = held_out_quality(model, x_test, run.name, run.eval_batch_size)
    write_figure(model, x_test, out, run.eval_batch_size, run.seed)
    config = {**run.to_options(), "levels": levels, "event_shape": list(x_train.shape[1:]),
              "n_test": len(x_test), "objective": model.likelihood_metric,
              "keras_rnode": __version__}
    write_json(config, os.path.join(out, CONFIG_FILE))
    write_json(history, os.path.join(out, HISTORY_FILE))
    metrics = {
        "train": last,
        "test": result,
        "train_seconds": round(train_seconds, 3),
        "resumed_from_step": resumed,
        "wall_seconds": round(time.perf_counter() - start, 3),
    }
    write_json(metrics, os.path.join(out, METRICS_FILE))
    return RunReport(out, run.name, result, train_seconds)


def _strategy(settings):
    """The tf.distribute strategy to build the model under, or None (one device; JAX's
    DataParallel, which is set globally): `backend.distribute.data_parallel`."""
    from keras_rnode.backend.distribute import data_parallel

    try:
        strategy = data_parallel(settings.devices, settings.workers)
    except RuntimeError as err:
        raise RunFailed(str(err)) from err
    replicas = strategy.num_replicas_in_sync if strategy is not None else settings.devices
    if settings.batch_size % replicas:
        raise OptionConflict(f"--batch-size {settings.batch_size} must be divisible by the "
                             f"{replicas} replicas: each takes an equal share")
    return strategy


def compiled_model(settings, event_shape, levels):
    """The RNODE the (resolved) settings describe, compiled as `train` compiles it."""
    model = _model(settings, event_shape, levels)
    model.compile(optimizer=_optimizer(model, settings), jit_compile=settings.jit)
    return model


def _model(settings, event_shape, levels):
    """The RNODE the (resolved) settings describe."""
    return build_model(
        event_shape, levels, hidden=settings.hidden, blocks=settings.blocks,
        regularizers={"kinetic": settings.kinetic, "jacobian": settings.jacobian},
        logit_alpha=settings.logit_alpha, seed=settings.seed, solver=settings.solver,
        eval_solver=settings.eval_solver, trace=settings.trace,
        eval_trace=settings.eval_trace, noise=settings.noise,
        architecture=settings.architecture, layer_type=settings.layer_type)


def _optimizer(model, settings):
    """Adam, warmed up if asked, wrapped so that steps with NaN/inf (or a failed solve) are
    not applied."""
    import keras

    from keras_rnode.models.schedules import LinearWarmup
    from keras_rnode.optimizers import SkipBadSteps

    lr = settings.lr
    if settings.warmup_steps:
        lr = LinearWarmup(lr, settings.warmup_steps)
    guard = model.solves_succeeded if settings.on_max_steps != "warn" else None
    return SkipBadSteps(keras.optimizers.Adam(lr), guard=guard)


def default_epochs(steps_per_epoch):
    """The epochs of a run given neither --epochs nor --steps: DEFAULT_EPOCHS, or more where
    those would be fewer than DEFAULT_MIN_STEPS steps."""
    return max(DEFAULT_EPOCHS, math.ceil(DEFAULT_MIN_STEPS / steps_per_epoch))


def _start_checkpoint(settings):
    """A fresh checkpoint folder holding the run's options, unless the run is resumed."""
    if settings.resume:
        return
    checkpoint = os.path.join(settings.out, CHECKPOINT_DIR)
    shutil.rmtree(checkpoint, ignore_errors=True)  # --overwrite: start over
    os.makedirs(checkpoint)
    write_json(settings.to_options(), os.path.join(checkpoint, OPTIONS_FILE))


def _fit(model, x_train, settings):
    """Train as the settings say, checkpointing into the run directory: (history, resumed, stop)."""
    from keras_rnode import callbacks
    from keras_rnode.datasets.pipeline import make_dataset
    from keras_rnode.resumable import fit_resumable

    steps, batch = settings.steps, settings.batch_size

    # One seeded stream of batches for the whole run, so a resumed run can
    # skip exactly the batches already trained on.
    def stream(start):  # built afresh: a reused one would reshuffle differently
        return make_dataset(x_train, batch, seed=settings.seed, repeat=True, start=start)

    watches = [callbacks.BadSteps(settings.on_nan),
               callbacks.SolverFailures(settings.on_max_steps)]
    if settings.nfe_limit:
        watches.append(callbacks.NFEWatch(settings.nfe_limit,
                                          stop=settings.on_nfe_limit == "stop"))
    try:
        history, resumed = fit_resumable(
            model, stream, steps or len(x_train) // batch,
            1 if steps else (settings.epochs or default_epochs(len(x_train) // batch)),
            os.path.join(settings.out, CHECKPOINT_DIR), settings.checkpoint_every or 2**62,
            callbacks=watches, verbose=0 if settings.quiet else 1)
    except KeyboardInterrupt:
        raise RunInterrupted(resume_hint(settings.out)) from None
    stop = next((w.stop_reason for w in watches if w.stop_reason), None)
    return history, resumed, stop
