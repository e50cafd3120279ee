"""A training run: its directory, the resume rules, training it, and using what it left.

A run directory, which `train` fills, holds

    model.keras    the trained model (keras.saving.load_model)
    config.json    every option of the run as the data resolved it ("given": as it
                   was given, where that differs), and what was derived from them
    metrics.json   final training metrics, held-out nll or bits/dim, NFE, times
    history.json   the per-epoch training metrics
    density.png    2-D data: the data beside the learned density
    samples.png    images of 1, 3 or 4 channels: a grid of samples
    checkpoint/    while the run is unfinished: its options and its last checkpoint

Whatever stops a run, what it left can be finished: checkpoint/ goes
last, once metrics.json is written, and config.json comes before
model.keras, so that a model always has what `rnode evaluate` and `rnode
sample` need beside it. `rnode train --resume` continues a run from its
checkpoint, finishes one whose training is done (it evaluates, draws the
figure, writes the metrics), and leaves a finished one as it is.

A run trains in one phase, or in two: flow matching, then a fine-tuning
phase by likelihood (with the run's penalties) from the weights flow
matching left. The states of a run directory, and what `rnode train
--resume --out RUN` does in each:

    finished      metrics.json written, no checkpoint/. Left as it is, unless
                  its objective is flow matching and the command gives
                  --objective likelihood with --steps N (or --epochs N):
                  that starts the fine-tuning phase (`begin_phase`): its
                  options, the records of the finished phase (phases.json)
                  and the weights it ended with (start.npz) are written to
                  a staging folder renamed to checkpoint/, so a stop at any
                  moment leaves either the finished run or the started
                  phase. It then trains as an interrupted run would.
    interrupted   checkpoint/options.json present. Continued with its own
                  options; the trouble and evaluation options may change.
                  A flow-matching run given --objective likelihood --steps N
                  first trains to its own end and evaluates, as a plain
                  --resume would, then fine-tunes as above: the fine-tuned
                  weights do not depend on where the first phase stopped.
                  A fine-tuning phase with no step checkpoint yet starts
                  again from start.npz; one with a checkpoint continues
                  from it, with the same weights as an uninterrupted phase.

The fine-tuning phase takes a fresh Adam (the --lr and --warmup-steps of
the run): flow matching's moments are estimates of another loss's
gradients, orders of magnitude apart from the likelihood's, and its step
count would skip the warm-up. Its options are the run's but for
PHASE_OPTIONS. When it ends, config.json holds its options and "phases"
(each phase's objective and steps), history.json its own per-epoch
metrics at the top level, as any run's, and "phases" (each phase's
objective, steps and history), and metrics.json its result and "phases"
(each earlier phase's objective, steps, train and test results).

The settings of a run are `TrainSettings` (keras_rnode.train_settings),
whose errors name the options as the command line does (--epochs).
"""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass

from keras_rnode import __version__
from keras_rnode.datasets.registry import check_dataset, dataset_name, load_data, load_npy
from keras_rnode.datasets.toys import TOY_NAMES, toy_entropy
from keras_rnode.models.factory import build_model
from keras_rnode.plots import drawable, plot_density, plot_trajectories, save_samples
from keras_rnode.solvers.settings import EVAL_PREFIX, split_options
from keras_rnode.train_settings import (
    DEFAULT_EPOCHS,
    DEFAULT_MIN_STEPS,
    EVALUATION_OPTIONS,
    FLOW_MATCHING_OPTIONS,
    OptionConflict,
    TrainSettings,
    check_objective_options,
    check_step_size,
    flag,
    named_as_flags,
    spelled_out,
)
from keras_rnode.trajectories import STEPS

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
# In checkpoint/ of a fine-tuning phase: the finished phases' records, and its first weights.
PHASES_FILE = "phases.json"
START_WEIGHTS = "start.npz"
SAVED_MODEL_DIR = "saved_model"
# Options a resumed run may change: what to do on trouble, and how it shows.
RESUME_MAY_CHANGE = ("resume", "out", "quiet", "overwrite", "checkpoint_every", "on_nan",
                     "on_max_steps", "nfe_limit", "on_nfe_limit")
# Options a fine-tuning phase sets for itself: its objective and its length.
PHASE_OPTIONS = ("objective", *FLOW_MATCHING_OPTIONS, "epochs", "steps")
# `rnode sample`: the samples drawn unless told.
SAMPLES = 64


class RunFailed(RuntimeError):
    """A run that cannot go on (a watch stopped it, no devices); the message says what to do."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says how to go on."""


# --------------------------------------------------------- resuming a run --


def command_line_settings(options, given=()):
    """The TrainSettings of `rnode train`'s options (`TrainSettings.from_command_line`), or
    with `resume` the run's own (`resumed_settings`)."""
    if options.get("resume"):
        return resumed_settings(options, given)
    return TrainSettings.from_command_line(options, given)


def resumed_settings(options, given):
    """The run in options["out"], continued: its own settings, but for the few a resume may
    change (RESUME_MAY_CHANGE), which come from `options`, and the evaluation options
    (EVALUATION_OPTIONS) among `given`, which replace the run's.

    `options`: the command line's options, as `TrainSettings.from_command_line`
    takes them; `given`: the names among them given on the command line,
    which must otherwise agree with the run's. A finished run is its own
    (and `train` leaves it as it is); its evaluation is then fixed too.
    A flow-matching run given --objective likelihood is fine-tuned (see
    the module's docstring): its settings get the phase's PHASE_OPTIONS,
    and new evaluation options may be given.
    """
    options = spelled_out(options, given)
    given = {"jit" if name == "no_jit" else name for name in given}
    out = options.get("out")
    if not out:
        raise OptionConflict("--resume needs --out RUN_DIR, the run to continue")
    saved = run_settings(out)
    if saved is None:
        if not os.path.isdir(out):
            raise FileNotFoundError(f"nothing to resume: {out} does not exist")
        raise FileNotFoundError(f"nothing to resume: {out} holds no run (neither "
                                f"{os.path.join(CHECKPOINT_DIR, OPTIONS_FILE)} nor a finished "
                                f"run's {CONFIG_FILE})")
    finished = finished_report(out) is not None
    settable = () if finished else EVALUATION_OPTIONS
    objective = options["objective"] if "objective" in given else saved.objective
    check_objective_options(objective, {name: options[name] for name in FLOW_MATCHING_OPTIONS
                                        if name in given})
    phase = {}
    if fine_tunes(saved, objective):
        phase = _fine_tuning_phase(out, saved, options, given)
        settable = EVALUATION_OPTIONS
    was = saved.command_line()
    # Options the resume may set; the rest must be the run's own (a phase's pinned
    # activation among them: the network is the run's).
    free = set(RESUME_MAY_CHANGE) | set(settable) | (set(PHASE_OPTIONS) & set(phase))
    for key in sorted(given - free):
        value = list(options[key]) if isinstance(options[key], tuple) else options[key]
        if was.get(key) == value:
            continue
        if finished and key in ("steps", "epochs"):
            raise OptionConflict(
                f"the run in {out} has finished training by {saved.objective}; with --resume, "
                f"{flag(key)} gives a flow-matching run a likelihood phase (--objective "
                "likelihood). To train longer, start a new run (another --out)")
        was_given = "not given" if was.get(key) is None else repr(was.get(key))
        raise OptionConflict(f"--resume continues the run with its own options; "
                             f"{flag(key)} was {was_given}, drop {flag(key)}")
    evaluation = {key: options[key] for key in given & set(settable)}
    solver = split_options(evaluation, EVAL_PREFIX)
    eval_solver = saved.eval_solver
    if solver:
        check_step_size({"step_size": eval_solver.step_size, **solver}, EVAL_PREFIX)
        with named_as_flags(EVAL_PREFIX):
            eval_solver = eval_solver.for_evaluation(**solver)
    return dataclasses.replace(saved, eval_solver=eval_solver, **evaluation, **phase,
                               **{key: options[key] for key in RESUME_MAY_CHANGE})


def run_settings(out):
    """The TrainSettings of the run in `out` as it stands: an interrupted run's (or phase's)
    options, a finished run's config; None where there is no run."""
    path = os.path.join(out, CHECKPOINT_DIR, OPTIONS_FILE)
    if os.path.isfile(path):
        return TrainSettings.from_options(_read_json(path))
    if finished_report(out) is not None:
        config = load_config(out)
        return TrainSettings.from_options({**config, **config.get("given", {})})
    return None


def fine_tunes(current, objective):
    """Whether a run of `current` settings resumed with `objective` starts a fine-tuning
    phase: a flow-matching run switched to the likelihood."""
    from keras_rnode import objectives

    return (current.objective == objectives.FlowMatching.name
            and objective == objectives.Likelihood.name)


def _fine_tuning_phase(out, saved, options, given):
    """The PHASE_OPTIONS of the likelihood phase the command line asks of the flow-matching
    run in `out` (of settings `saved`, finished or not), with the activation its network
    has; OptionConflict without its length."""
    if not {"steps", "epochs"} & given:
        raise OptionConflict(f"--objective likelihood fine-tunes the flow-matching run in {out} "
                             "in a phase of its own: give its length, --steps N or --epochs N")
    # The network stays the one flow matching trained: "auto" is not chosen again for the
    # likelihood (SiLU for flow matching, softplus for the likelihood).
    phase = dict(objective=options["objective"], coupling=TrainSettings.coupling,
                 sigma=TrainSettings.sigma, steps=None, epochs=None,
                 activation=saved.network_activation)
    return {**phase, **{key: options[key] for key in ("steps", "epochs") if key in given}}


def with_phase(settings, other):
    """`settings` with the PHASE_OPTIONS of `other`."""
    return dataclasses.replace(settings, **{key: getattr(other, key) for key in PHASE_OPTIONS})


def begin_phase(settings):
    """Start the fine-tuning phase `settings` describe on the finished run in their out: its
    checkpoint folder holds its options, the finished phase's record (PHASES_FILE) and the
    weights it ended with (START_WEIGHTS), and appears at once (a renamed staging folder)."""
    import numpy as np

    out = settings.run_dir
    config, history = load_config(out), _read_json(os.path.join(out, HISTORY_FILE), {})
    metrics = _read_json(os.path.join(out, METRICS_FILE), {})
    finished = TrainSettings.from_options(config)
    record = {"objective": finished.training_objective.to_config(),
              "steps": config.get("phases", [{}])[-1].get("steps"), "history": history,
              "train": metrics.get("train", {}), "test": metrics.get("test")}
    staging = os.path.join(out, ".partial." + CHECKPOINT_DIR)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    np.savez(os.path.join(staging, START_WEIGHTS), *load_model(out).get_weights())
    write_json([record], os.path.join(staging, PHASES_FILE))
    write_json(settings.to_options(), os.path.join(staging, OPTIONS_FILE))
    os.replace(staging, os.path.join(out, CHECKPOINT_DIR))


def _start_weights(model, checkpoint):
    """Give a fine-tuning phase that has no step checkpoint yet the weights it starts from."""
    import numpy as np

    from keras_rnode.resumable import StepBackup

    if StepBackup.resume_step(checkpoint) is None:
        with np.load(os.path.join(checkpoint, START_WEIGHTS)) as saved:
            model.set_weights([saved[f"arr_{i}"] for i in range(len(saved.files))])


def resume_hint(out, total_steps=None):
    """What `rnode train --resume` does for the run in `out`, for a message."""
    from keras_rnode.resumable import StepBackup

    checkpoint = os.path.join(out, CHECKPOINT_DIR)
    step = StepBackup.resume_step(checkpoint)
    resume = f"`rnode train --resume --out {out}`"
    if step is None:
        again = ("the fine-tuning phase again from the weights it started with"
                 if os.path.isfile(os.path.join(checkpoint, PHASES_FILE))
                 else "the run again with its options")
        return f"no checkpoint was saved yet (--checkpoint-every); {resume} starts {again}"
    if total_steps is not None and step >= total_steps:
        return (f"training is done (step {step}); {resume} evaluates the model and writes "
                "the figure and metrics")
    return f"{resume} continues from the checkpoint at step {step}"


# ----------------------------------------------------------- run directory --


def check_run_dir(settings):
    """Refuse to write over a model or an interrupted run unless the settings say so."""
    from keras_rnode.resumable import StepBackup

    out = settings.run_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"--out {out} is a file, not a run directory")
    checkpoint = os.path.join(out, CHECKPOINT_DIR)
    if settings.resume or settings.overwrite:
        return
    # The options file is written as a run starts and removed when it is finished.
    if os.path.isfile(os.path.join(checkpoint, OPTIONS_FILE)):
        step = StepBackup.resume_step(checkpoint) or 0
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


def _read_json(path, default=None):
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return json.load(f)


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
    return _read_json(os.path.join(run_dir, CONFIG_FILE), {})


def finished_report(out):
    """The RunReport of the finished run in `out` (its metrics written, no checkpoint left),
    or None."""
    metrics = _read_json(os.path.join(out, METRICS_FILE), {})
    config = load_config(out)
    if (os.path.exists(os.path.join(out, CHECKPOINT_DIR)) or "test" not in metrics
            or "dataset" not in config):
        return None
    return RunReport(out, dataset_name(config["dataset"]), metrics["test"],
                     metrics.get("train_seconds", 0.0), finished_before=True)


def _save_model(model, out):
    os.makedirs(out, exist_ok=True)
    partial = os.path.join(out, ".partial." + MODEL_FILE)
    model.save(partial)
    os.replace(partial, os.path.join(out, MODEL_FILE))


def write_figure(model, x_test, out, batch_size, seed):
    """density.png for 2-D data, samples.png for images that draw (1, 3 or 4 channels),
    no picture for other data; drop a picture a run left that is not this one."""
    import keras

    event_shape = tuple(model.event_shape)
    figure = None
    if event_shape == (2,):
        figure = DENSITY_FILE
        plot_density(model, x_test, os.path.join(out, figure), batch_size)
    elif drawable(event_shape):
        figure = SAMPLES_FILE
        samples = keras.ops.convert_to_numpy(model.sample(36, seed=seed))
        save_samples(samples, os.path.join(out, figure), model.levels)
    for stale in {DENSITY_FILE, SAMPLES_FILE} - {figure}:
        if os.path.exists(os.path.join(out, stale)):
            os.remove(os.path.join(out, stale))


# -------------------------------------------------------------- evaluation --


def held_out_quality(model, x, name, batch_size, kinetic=True):
    """`evaluate_model` on x (with the flow's kinetic energy unless kinetic=False), with a
    toy's entropy (the floor of its nll) beside it."""
    from keras_rnode.evaluation import evaluate_model

    result = evaluate_model(model, x, batch_size, kinetic=kinetic)
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


def evaluate_run(run_dir, dataset=None, n_test=None, batch_size=None, trace=None, probes=None,
                 kinetic=True, **solver):
    """`rnode evaluate`: (name, result) of the run's model on its test split, or on
    `dataset`, with its evaluation settings but for those given (see `choose_evaluation`;
    a fixed-step method needs its step), the flow's kinetic energy unless kinetic=False,
    and the run's training phases (objective and steps of each). Errors name the options
    as flags."""
    check_step_size(solver)
    model = load_model(run_dir)
    with named_as_flags():
        choose_evaluation(model, trace, probes, **solver)
    config = load_config(run_dir)
    x, name = evaluation_data(config, dataset, n_test)
    batch_size = batch_size or config.get("eval_batch_size", TrainSettings().eval_batch_size)
    result = held_out_quality(model, x, name, batch_size, kinetic)
    if config.get("phases"):  # what trained it (runs before phases were kept have none)
        result["phases"] = config["phases"]
    return name, result


# ---------------------------------------------------- sampling and export --


def write_samples(run_dir, n, out, seed=None):
    """n samples of the run's model into `out` (.npy: the array; .png: a scatter for 2-D, a
    grid of images); returns their event shape."""
    import keras

    model = load_model(run_dir)
    samples = keras.ops.convert_to_numpy(model.sample(n, seed=seed))
    save_samples(samples, out, model.levels)
    return tuple(samples.shape[1:])


def write_trajectories(run_dir, n, out, steps=STEPS):
    """The paths of the run's first n held-out points through its flow into `out` (.npy:
    the positions; .png: a picture); returns (points, pieces, length ratio)."""
    import numpy as np

    from keras_rnode.trajectories import length_ratio, trajectories

    model = load_model(run_dir)
    x, _ = evaluation_data(load_config(run_dir), n_test=n)
    paths = trajectories(model, x[:n], steps)
    if out.endswith(".npy"):
        np.save(out, paths)
    else:
        plot_trajectories([paths], out)
    return len(x[:n]), len(paths) - 1, length_ratio(paths)


def export_run(run_dir, out=None, overwrite=False):
    """The run's model as a SavedModel in `out` (RUN_DIR/saved_model by default); returns
    (its path, the endpoints written: `backend.saved_model_endpoints`, which decides)."""
    from keras_rnode import backend

    out = out or os.path.join(run_dir, SAVED_MODEL_DIR)
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    path = load_model(run_dir).export(out, overwrite=overwrite)
    return path, backend.saved_model_endpoints()


# ---------------------------------------------------------------- training --


@dataclass(frozen=True)
class RunReport:
    """A finished run: where it is, its data set's name, its held-out result, training time;
    `finished_before`: it was finished before this call, which left it as it was."""

    out: str
    name: str
    test: dict
    train_seconds: float
    finished_before: bool = False


def train(settings, note=print):
    """Train the run `settings` describe, evaluate it, and fill its run directory.

    `note(text)` tells of a setting the machine changes (jit off across
    logical CPU devices). Raises RunFailed when a watch stopped training
    (the model is saved with its last good weights, the checkpoint kept) or
    the held-out evaluation failed (the model and its config are saved),
    and RunInterrupted on Ctrl-C once the run has begun to write; each
    message says how to go on. With `resume`, a finished run is left as it
    is: its report comes back.

    With `workers` (TF_CONFIG names the cluster) every worker trains; the
    chief writes the run directory, the others do the same work, into a
    scratch directory of their own that is removed at the end (on a resume
    they start from a copy of the chief's checkpoint, which --out must
    reach). A worker that dies fails the others' run with RunFailed.

    Resumed settings whose objective is the likelihood, of a run whose
    objective is flow matching, fine-tune it (the module's docstring).
    """
    from keras_rnode.backend.distribute import is_chief, lost_worker

    current = run_settings(settings.run_dir) if settings.resume else None
    if current is not None and fine_tunes(current, settings.objective):
        if settings.workers:
            raise OptionConflict("a fine-tuning phase trains on one machine; a multi-worker "
                                 "flow-matching run cannot be fine-tuned yet")
        if finished_report(settings.run_dir) is None:  # flow matching first, to its end
            _train(with_phase(settings, current), note)
        begin_phase(settings)
    elif settings.resume and finished_report(settings.run_dir) is not None:
        return finished_report(settings.run_dir)
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
    """Everything is checked (options, data, model) before anything is written."""
    import keras

    from keras_rnode import backend
    from keras_rnode.backend.distribute import supports_jit
    from keras_rnode.backend.graph_options import avoid_addn_rewrite_race

    start = time.perf_counter()
    settings = dataclasses.replace(settings, out=settings.run_dir)
    out = settings.out
    check_run_dir(settings)
    # Devices must be set up before TensorFlow does any work.
    strategy = _strategy(settings)
    toy = settings.dataset in TOY_NAMES
    x_train, levels = load_data(settings.dataset, "train", settings.n_train if toy else None,
                                seed=settings.seed)
    x_test, _ = load_data(settings.dataset, "test", settings.n_test, seed=settings.seed)
    steps_per_epoch, epochs = schedule(settings, len(x_train))
    event_shape = tuple(x_train.shape[1:])
    run = settings.resolved(event_shape)
    if strategy is not None and run.jit and not supports_jit(strategy):
        if settings.jit is True:
            note("note: XLA cannot compile one step across logical CPU devices; training in "
                 "graph mode (--no-jit)")
        run = dataclasses.replace(run, jit=False)
    if run.jit and run.host_assignment and not backend.HOST_CALLS_COMPILE:
        note(f"note: --coupling ot solves its assignment on the host, which XLA cannot "
             f"compile on {backend.NAME}; training in graph mode (--no-jit)")
        run = dataclasses.replace(run, jit=False)
    if levels and not run.jit:
        avoid_addn_rewrite_race()  # see there: a TensorFlow race in graph-mode image steps
    checkpoint = os.path.join(out, CHECKPOINT_DIR)
    # A fine-tuning phase's records; a run started afresh has none (its checkpoint goes).
    earlier = _read_json(os.path.join(checkpoint, PHASES_FILE), []) if settings.resume else []
    keras.utils.set_random_seed(settings.seed)
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = compiled_model(run, event_shape, levels)
        if earlier:
            model.build((None, *event_shape))
            _start_weights(model, checkpoint)
    total_steps = steps_per_epoch * epochs
    phase = {"objective": run.training_objective.to_config(), "steps": total_steps}
    resolved = run.to_options()
    config = {**resolved, "levels": levels, "event_shape": list(event_shape),
              # What the data or the machine decided: a resume decides again (--jit auto
              # is graph mode for the OT coupling on TensorFlow, XLA for its fine-tuning).
              "given": {k: v for k, v in settings.to_options().items() if v != resolved[k]},
              "n_test": len(x_test), "metric": model.likelihood_metric,
              "phases": [{k: r[k] for k in phase} for r in earlier] + [phase],
              "keras_rnode": __version__}

    try:
        # The options as given, not as resolved: a resume resolves them again.
        _start_checkpoint(settings)
        fit_start = time.perf_counter()
        history, resumed, stop = _fit(model, x_train, run, steps_per_epoch, epochs)
        train_seconds = time.perf_counter() - fit_start
        history = {k: [float(v) for v in vs] for k, vs in history.items()}
        if resumed == total_steps:  # trained before, interrupted after: its history stands
            history = _phase_history(out, earlier)
        last = {k: vs[-1] for k, vs in history.items() if vs}
        write_json(config, os.path.join(out, CONFIG_FILE))
        write_json(history if not earlier else {**history, "phases": [
            {"objective": r["objective"], "steps": r["steps"], "history": r["history"]}
            for r in [*earlier, {**phase, "history": history}]]},
            os.path.join(out, HISTORY_FILE))
        _save_model(model, out)
        before = {"phases": [{k: r[k] for k in ("objective", "steps", "train", "test")}
                             for r in earlier]} if earlier else {}
        if stop is not None:
            write_json({"stopped": stop, "resumed_from_step": resumed, "train": last, **before},
                       os.path.join(out, METRICS_FILE))
            raise RunFailed(f"training stopped: {stop}. {out}/{MODEL_FILE} holds the last good "
                            f"weights; {resume_hint(out)}")
        result = _held_out(model, x_test, run)
        write_figure(model, x_test, out, run.eval_batch_size, run.seed)
        metrics = {
            "train": last,
            "test": result,
            "train_seconds": round(train_seconds, 3),
            "resumed_from_step": resumed,
            "wall_seconds": round(time.perf_counter() - start, 3),
            **before,
        }
        write_json(metrics, os.path.join(out, METRICS_FILE))
        shutil.rmtree(os.path.join(out, CHECKPOINT_DIR), ignore_errors=True)
    except KeyboardInterrupt:
        raise RunInterrupted(resume_hint(out, total_steps)) from None
    return RunReport(out, run.name, result, train_seconds)


def _phase_history(out, earlier):
    """The history this phase wrote before it was interrupted; {} where it wrote none (a
    fine-tuning phase's history.json is the finished phase's until it has its "phases")."""
    history = _read_json(os.path.join(out, HISTORY_FILE), {})
    if earlier and "phases" not in history:
        return {}
    return {k: v for k, v in history.items() if k != "phases"}


def _held_out(model, x_test, run):
    """The trained model's held-out quality; a failed solve says how to finish the run."""
    try:
        return held_out_quality(model, x_test, run.name, run.eval_batch_size)
    except ValueError as err:
        out = run.out
        raise RunFailed(
            f"evaluating the trained model failed: {err}. {out}/{MODEL_FILE} holds it: `rnode "
            f"evaluate {out}` scores it with other evaluation options (--method, --rtol, "
            f"--atol, --step-size, --trace), and `rnode train --resume --out {out}` with them "
            f"(--eval-method, --eval-rtol, ...) finishes the run") from None


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
        regularizers=settings.regularizers,
        logit_alpha=settings.logit_alpha, seed=settings.seed, solver=settings.solver,
        eval_solver=settings.eval_solver, trace=settings.trace,
        eval_trace=settings.eval_trace, noise=settings.noise,
        architecture=settings.architecture, layer_type=settings.layer_type,
        objective=settings.training_objective, activation=settings.activation)


def _optimizer(model, settings):
    """Adam, warmed up if asked, wrapped so that steps with NaN/inf (or a failed solve) are
    not applied."""
    import keras

    from keras_rnode.models.schedules import LinearWarmup
    from keras_rnode.optimizers import SkipBadSteps

    lr = settings.lr
    if settings.warmup_steps:
        lr = LinearWarmup(lr, settings.warmup_steps)
    guard = (model.solves_succeeded if settings.on_max_steps != "warn"
             and settings.solves_in_training else None)
    return SkipBadSteps(keras.optimizers.Adam(lr), guard=guard)


def default_epochs(steps_per_epoch):
    """The epochs of a run given neither --epochs nor --steps: DEFAULT_EPOCHS, or more where
    those would be fewer than DEFAULT_MIN_STEPS steps."""
    return max(DEFAULT_EPOCHS, math.ceil(DEFAULT_MIN_STEPS / steps_per_epoch))


def schedule(settings, n_train):
    """(steps per epoch, epochs) of a run on n_train points: --steps as one epoch, else
    whole batches per epoch. ValueError where not one batch fits the data."""
    if settings.batch_size > n_train:
        more = " or a larger --n-train" if settings.dataset in TOY_NAMES else ""
        raise ValueError(f"--batch-size {settings.batch_size} is larger than the {n_train} "
                         f"training points: give a smaller --batch-size{more}")
    if settings.steps:
        return settings.steps, 1
    steps_per_epoch = n_train // settings.batch_size
    return steps_per_epoch, settings.epochs or default_epochs(steps_per_epoch)


def _start_checkpoint(settings):
    """A fresh checkpoint folder holding the run's options, unless the run is resumed."""
    if settings.resume:
        return
    checkpoint = os.path.join(settings.out, CHECKPOINT_DIR)
    shutil.rmtree(checkpoint, ignore_errors=True)  # --overwrite: start over
    os.makedirs(checkpoint)
    write_json(settings.to_options(), os.path.join(checkpoint, OPTIONS_FILE))


def _fit(model, x_train, settings, steps_per_epoch, epochs):
    """Train as the settings say, checkpointing into the run directory: (history, resumed, stop)."""
    from keras_rnode import callbacks
    from keras_rnode.datasets.pipeline import make_dataset
    from keras_rnode.progress import fit_progress
    from keras_rnode.resumable import fit_resumable

    # One seeded stream of batches for the whole run, so a resumed run can
    # skip exactly the batches already trained on.
    def stream(start):  # built afresh: a reused one would reshuffle differently
        return make_dataset(x_train, settings.batch_size, seed=settings.seed, repeat=True,
                            start=start)

    watches = [callbacks.BadSteps(settings.on_nan)]
    # Flow matching solves nothing in training: no solve to watch (a fine-tuning phase
    # by likelihood watches with the run's options).
    if settings.solves_in_training:
        watches.append(callbacks.SolverFailures(settings.on_max_steps))
    if settings.nfe_limit and settings.solves_in_training:
        watches.append(callbacks.NFEWatch(settings.nfe_limit,
                                          stop=settings.on_nfe_limit == "stop"))
    # Keras's bar on a terminal; a plain line every few steps in a log file.
    verbose, progress = fit_progress(quiet=settings.quiet)
    history, resumed = fit_resumable(
        model, stream, steps_per_epoch, epochs, os.path.join(settings.out, CHECKPOINT_DIR),
        settings.checkpoint_every or 2**62, callbacks=[*watches, *progress], verbose=verbose)
    stop = next((w.stop_reason for w in watches if w.stop_reason), None)
    return history, resumed, stop
