"""The `rnode` command line: train, evaluate, sample and export RNODE models.

Click code only: each command parses its options, calls the library and
turns its errors into click's one-line `Error: ...`. The work is done in
keras_rnode.runs (the run directory, `TrainSettings`, resuming, training),
keras_rnode.evaluation, keras_rnode.plots, keras_rnode.datasets.registry
(data sets by name) and keras_rnode.models.factory (the model).

The solver's options are generated from one list, SOLVER_OPTIONS: each
entry is a field of `SolverSettings` and becomes --NAME and, for the
evaluation solver, --eval-NAME (and `rnode evaluate`'s --NAME).

The option choices come from modules that load without keras; keras and
TensorFlow are imported inside the commands that use them (`_load_keras`),
so that `rnode --help` answers at once.
"""

import dataclasses
import functools
import importlib.util
import os
import re
import sys
from collections.abc import Callable

import click
import numpy as np
from click.core import ParameterSource

from keras_rnode import runs
from keras_rnode.actions import ACTIONS
from keras_rnode.datasets.registry import IMAGE_DATASETS, TOY_TEST_SIZE, check_dataset
from keras_rnode.datasets.toy import TOY_NAMES
from keras_rnode.layers.divergence import EXACT_TRACE_MAX_DIM, PROBES, TRACES
from keras_rnode.models.conv_dynamics import CONV_DYNAMICS
from keras_rnode.models.factory import (
    ARCHITECTURES,
    DEFAULT_DENSE_IMAGE_HIDDEN,
    DEFAULT_HIDDEN,
    DENSE_MAX_DIM,
)
from keras_rnode.plots import plot_trajectories, save_samples
from keras_rnode.solvers.settings import (
    FIXED_STEP_METHODS,
    GRADIENTS,
    METHODS,
    SettingError,
    SolverSettings,
)

# ------------------------------------------------------------------ errors --


def _one_line(err):
    """An exception as one line: Keras's call context and ANSI codes dropped."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    text = text.split("Arguments received by")[0]
    text = text.replace("Exception encountered when calling", "in")
    return " ".join(text.split()) or type(err).__name__


def friendly_errors(fn):
    """Turn the errors bad input raises into click's one-line `Error: ...`.

    Conflicting options are usage errors (exit code 2), the rest exit with 1.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except runs.OptionConflict as err:
            raise click.UsageError(_one_line(err)) from None
        # ImportError: a TensorFlow-only feature asked for where TensorFlow is absent.
        except (ValueError, OSError, ImportError, runs.RunFailed) as err:
            raise click.ClickException(_one_line(err)) from None

    return wrapper


def _load_keras(seeds=False):
    """Import keras for a command, silencing what TensorFlow's C++ side prints while it loads
    and looks for devices (oneDNN, the CUDA probes, absl's "before InitializeLog" line).

    Those lines are written to the process's stderr before TF_CPP_MIN_LOG_LEVEL
    applies, so only its file descriptor, closed for that moment, stops them;
    TF_CPP_MIN_LOG_LEVEL=0 keeps them. `seeds`: the command calls
    keras.utils.set_random_seed, which imports TensorFlow (to seed it) under
    every backend where it is installed: then TensorFlow loads here, quietly.
    """
    if "keras" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import keras

        if keras.config.backend() == "tensorflow" or (
                seeds and importlib.util.find_spec("tensorflow") is not None):
            import tensorflow as tf

            tf.config.list_physical_devices()  # its CUDA probe logs an error on a CPU
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _positive(ctx, param, value):
    if value is not None and value <= 0:
        raise click.BadParameter(f"must be positive, got {value}")
    return value


def _dataset_option(ctx, param, value):
    try:
        return check_dataset(value)
    except (ValueError, OSError) as err:
        raise click.BadParameter(_one_line(err)) from None


def _hidden_option(ctx, param, value):
    """'64,64,64' -> (64, 64, 64)."""
    if value is None:
        return None
    try:
        widths = tuple(int(p) for p in value.split(","))
        if not widths or min(widths) < 1:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"--hidden must be comma-separated positive integers such "
                                 f"as 64,64,64; got {value!r}") from None
    return widths


# ---------------------------------------------------------- solver options --


@dataclasses.dataclass(frozen=True)
class SolverOption:
    """A `SolverSettings` field on the command line: --NAME, and --eval-NAME if `evaluation`.

    The default is the field's own unless `default` gives another.
    """

    field: str
    type: object
    help: str
    evaluation: bool = False
    eval_help: str | None = None
    callback: Callable | None = None
    default: object = None


# Training needs a gradient; "none" is for inference.
TRAINING_GRADIENTS = tuple(g for g in GRADIENTS if g != "none")

SOLVER_OPTIONS = (
    SolverOption("method", click.Choice(METHODS),
                 f"Training solver; {' and '.join(FIXED_STEP_METHODS)} need --step-size.",
                 evaluation=True,
                 eval_help="Solver for held-out evaluation, sampling and export."),
    SolverOption("rtol", float, "Relative tolerance of the adaptive training solver.",
                 evaluation=True, eval_help="Relative tolerance of the adaptive evaluation "
                 "solver.", callback=_positive),
    SolverOption("atol", float, "Absolute tolerance of the adaptive training solver.",
                 evaluation=True, eval_help="Absolute tolerance of the adaptive evaluation "
                 "solver.", callback=_positive),
    SolverOption("step_size", float,
                 "Step of a fixed-step training solver (the paper: rk4, 0.25).",
                 evaluation=True, eval_help="Step of a fixed-step evaluation solver.",
                 callback=_positive),
    SolverOption("max_steps", click.IntRange(min=1), "Bound on solver steps per solve."),
    SolverOption("gradient", click.Choice(TRAINING_GRADIENTS),
                 "direct backpropagation through the accepted steps (faster) or adjoint "
                 "(memory flat in the steps).", default="direct"),
)


def _flag(prefix, field):
    return "--" + (prefix + field).replace("_", "-")


def _add_options(command, entries):
    """Add an option for each (SolverOption, flag prefix, help, default), in order."""
    for option, prefix, text, default in reversed(entries):  # decorators apply bottom-up
        command = click.option(_flag(prefix, option.field), default=default,
                               show_default=default is not None, type=option.type,
                               callback=option.callback, help=text)(command)
    return command


def solver_options(command):
    """Add --X for every SOLVER_OPTIONS entry, then --eval-X for those with an eval twin."""
    defaults = SolverSettings()

    def default(option):
        return getattr(defaults, option.field) if option.default is None else option.default

    entries = [(o, "", o.help, default(o)) for o in SOLVER_OPTIONS]
    entries += [(o, "eval_", o.eval_help, default(o)) for o in SOLVER_OPTIONS if o.evaluation]
    return _add_options(command, entries)


def evaluation_solver_options(command):
    """Add --X for the SOLVER_OPTIONS entries with an eval twin: a trained run's evaluation
    solver, changed for one evaluation (None: the run's own)."""
    return _add_options(command, [(o, "", f"{o.eval_help}  [default: the run's]", None)
                                  for o in SOLVER_OPTIONS if o.evaluation])


def _check_step_size(values, prefix):
    """A fixed-step method needs its step: unset, it would silently take another (the
    training one, the run's)."""
    if values["method"] in FIXED_STEP_METHODS and values["step_size"] is None:
        raise click.UsageError(f"{_flag(prefix, 'method')} {values['method']} needs "
                               f"{_flag(prefix, 'step_size')}")


def _checked(make, prefix):
    """make() -> SolverSettings, its errors naming the options as the command line does."""
    try:
        return make()
    except SettingError as err:
        raise click.ClickException(err.render(functools.partial(_flag, prefix))) from None


def _pop_solver_settings(options):
    """The training and evaluation SolverSettings, their options popped from `options`."""
    train = {o.field: options.pop(o.field) for o in SOLVER_OPTIONS}
    evaluation = {o.field: options.pop("eval_" + o.field) for o in SOLVER_OPTIONS
                  if o.evaluation}
    for prefix, values in (("", train), ("eval_", evaluation)):
        _check_step_size(values, prefix)
    solver = _checked(lambda: SolverSettings(**train), "")
    return solver, _checked(lambda: solver.for_evaluation(**evaluation), "eval_")


# ---------------------------------------------------------------- commands --


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Continuous normalizing flows trained the RNODE way (kinetic + Jacobian regularization).

    A run directory holds a trained model (model.keras), its options
    (config.json), its metrics (metrics.json, history.json) and a figure.

    \b
    Examples:
      rnode train --dataset pinwheel --steps 2000 --out runs/pinwheel
      rnode evaluate runs/pinwheel
      rnode sample runs/pinwheel -n 2000 --out pinwheel.png
      rnode export runs/pinwheel --out exported/pinwheel
      rnode train --dataset digits --hidden 32,32 --blocks 2 --epochs 20 --out runs/digits

    Run `rnode COMMAND --help` for each command's options.
    """


@main.command()
@click.option("--dataset", default="8gaussians", show_default=True, callback=_dataset_option,
              help=f"A 2-D toy distribution ({', '.join(TOY_NAMES)}), an image set "
                   f"({', '.join(IMAGE_DATASETS)}), or a .npy file of continuous data "
                   "(n, *event_shape), its last tenth held out.")
@click.option("--hidden", default=None, callback=_hidden_option,
              help="Widths of the dynamics net: dense units for flat data, conv channels "
                   "for images, comma-separated.  [default: "
                   f"{','.join(map(str, DEFAULT_HIDDEN))}; "
                   f"{','.join(map(str, DEFAULT_DENSE_IMAGE_HIDDEN))} dense on images]")
@click.option("--blocks", default=1, show_default=True, type=click.IntRange(min=1),
              help="Number of CNF blocks, each with its own dynamics net; multiscale: "
                   "blocks before and after each squeeze, and at the last scale.")
@click.option("--architecture", default="auto", show_default=True,
              type=click.Choice(ARCHITECTURES),
              help="Images: one chain of CNF blocks with conv dynamics (single) or with dense "
                   "dynamics on the flattened image (dense), or FFJORD's multiscale model "
                   "(squeeze, factor out half the channels, repeat; the paper's for MNIST, "
                   f"CIFAR-10); auto: dense up to {DENSE_MAX_DIM} values an image (the "
                   "digits), multiscale beyond.")
@click.option("--layer-type", default=None, type=click.Choice(sorted(CONV_DYNAMICS)),
              help="Images: conv dynamics, t as an extra channel (concat) or gated by t "
                   "(concatsquash).  [default: concat multiscale, concatsquash single]")
@click.option("--kinetic", default=0.01, show_default=True, type=click.FloatRange(min=0),
              help="lambda_K, weight of the kinetic-energy regularizer.")
@click.option("--jacobian", default=0.01, show_default=True, type=click.FloatRange(min=0),
              help="lambda_J, weight of the Jacobian Frobenius-norm regularizer.")
@solver_options
@click.option("--trace", default="auto", show_default=True,
              type=click.Choice(("auto", *TRACES)),
              help=f"Divergence estimator in training; auto: exact for flat data of at most "
                   f"{EXACT_TRACE_MAX_DIM} dimensions (the 2-D toys), hutchinson otherwise.")
@click.option("--eval-trace", default=None, type=click.Choice(TRACES),
              help="Divergence estimator at evaluation.  [default: as --trace]")
@click.option("--noise", default="gaussian", show_default=True, type=click.Choice(PROBES),
              help="Hutchinson probe noise.")
@click.option("--epochs", default=None, type=click.IntRange(min=1),
              help=f"Passes over the training data.  [default: {runs.DEFAULT_EPOCHS}, or as "
                   f"many as {runs.DEFAULT_MIN_STEPS} steps take; unless --steps]")
@click.option("--steps", default=None, type=click.IntRange(min=1),
              help="Train for exactly this many optimizer steps instead of epochs.")
@click.option("--batch-size", default=512, show_default=True, type=click.IntRange(min=1),
              help="Training batch size (the global batch, split across devices or workers).")
@click.option("--eval-batch-size", default=500, show_default=True, type=click.IntRange(min=1),
              help="Batch size of the held-out evaluation and the figure.")
@click.option("--lr", default=1e-3, show_default=True, type=float, callback=_positive,
              help="Adam learning rate.")
@click.option("--warmup-steps", default=0, show_default=True, type=click.IntRange(min=0),
              help="Raise the learning rate linearly over this many steps (the paper: 1000).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seeds weights, data order, noise; toy data is drawn with it (test: seed+1).")
@click.option("--n-train", default=100000, show_default=True, type=click.IntRange(min=1),
              help="Toy data: training sample size.")
@click.option("--n-test", default=None, type=click.IntRange(min=1),
              help=f"Held-out sample size.  [default: {TOY_TEST_SIZE} toy points, the whole "
                   "image test split]")
@click.option("--logit-alpha", default=1e-6, show_default=True, type=float,
              help="Images: alpha of the logit transform in front of the flow.")
@click.option("--devices", default=1, show_default=True, type=click.IntRange(min=1),
              help="Data-parallel training on this many devices (TensorFlow: tf.distribute."
                   "MirroredStrategy; JAX: keras.distribution.DataParallel): GPUs, or the "
                   "CPU split into logical devices.")
@click.option("--workers", is_flag=True,
              help="Train as one worker of the cluster the TF_CONFIG environment variable "
                   "describes (tf.distribute.MultiWorkerMirroredStrategy): every worker runs "
                   "the same command, --batch-size is the global batch, worker 0 writes --out.")
@click.option("--jit", "jit", default="auto", show_default=True, is_flag=False, flag_value="on",
              type=click.Choice(tuple(runs.JIT_CHOICES)),
              help="Compile the training step with XLA (on: the first step slow, then fast) "
                   "or not (off: graph mode); auto: XLA for flat data and on a GPU, graph mode "
                   "for images on a CPU, where it is faster. --jit alone is on.")
@click.option("--no-jit", is_flag=True, help="The same as --jit off.")
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Run directory.  [default: runs/DATASET]")
@click.option("--overwrite", is_flag=True, help="Replace a model already in the run directory.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--checkpoint-every", default=200, show_default=True, type=click.IntRange(min=0),
              help="Save a resumable checkpoint in RUN_DIR/checkpoint every N steps (0: "
                   "never); an interrupted run loses at most N steps.")
@click.option("--resume", is_flag=True,
              help="Continue the interrupted run in --out from its last checkpoint, with "
                   "its options; the result equals an uninterrupted run's.")
@click.option("--on-nan", default="stop", show_default=True, type=click.Choice(["skip", "stop"]),
              help="A step with a NaN or inf loss or gradient is never applied; skip it and "
                   "go on, or stop (the model keeps its last good weights).")
@click.option("--on-max-steps", default="warn", show_default=True, type=click.Choice(ACTIONS),
              help="A training solve that hits --max-steps: count and warn per epoch, skip "
                   "the step too, or stop before applying it.")
@click.option("--nfe-limit", default=None, type=click.IntRange(min=1),
              help="Warn (or, with --on-nfe-limit stop, stop) when a training step's NFE "
                   "exceeds this.")
@click.option("--on-nfe-limit", default="warn", show_default=True,
              type=click.Choice(["warn", "stop"]),
              help="What a step over --nfe-limit does: warn, or end the run at the first "
                   "such step.")
@friendly_errors
def train(**options):
    """Train an RNODE model and write a run directory.

    Minimizes nats (2-D and .npy data) or bits/dim (images) plus
    lambda_K * kinetic + lambda_J * jacobian, then evaluates the held-out
    split with the evaluation solver and prints its quality and NFE.

    \b
    Examples:
      rnode train --dataset 8gaussians --steps 1000 --out runs/8g
      rnode train --dataset checkerboard --hidden 64,64,64 --epochs 20 \\
          --kinetic 0.05 --jacobian 0.05 --out runs/checker
      rnode train --dataset mnist --hidden 64,64,64 --blocks 2 --method rk4 \\
          --step-size 0.25 --batch-size 200 --out runs/mnist
    """
    settings = _train_settings(options, click.get_current_context())
    _load_keras(seeds=True)
    from keras_rnode.evaluation import describe_result

    try:
        report = runs.train(settings, note=functools.partial(click.echo, err=True))
    except runs.RunInterrupted as err:
        click.echo(f"\ninterrupted; {err}", err=True)
        raise click.exceptions.Exit(130) from None
    click.echo(describe_result(report.name, report.test))
    click.echo(f"run directory: {report.out} (trained {report.train_seconds:.1f} s)")


def _train_settings(options, ctx):
    """The TrainSettings of `rnode train`'s parsed options (popped from `options`)."""
    given = {name for name in options
             if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}
    if options.pop("no_jit"):
        if "jit" in given:
            raise click.UsageError("give --jit or --no-jit, not both")
        options["jit"], given = "off", given | {"jit"}
    options["jit"] = runs.JIT_CHOICES[options["jit"]]
    if options["resume"]:
        return runs.resumed_settings(options, given)
    solver, eval_solver = _pop_solver_settings(options)
    return runs.TrainSettings(solver=solver, eval_solver=eval_solver, **options)


def train_settings(args=()):
    """The TrainSettings `rnode train ARGS` trains with, for scripts and benchmarks."""
    with train.make_context("train", list(args)) as ctx:
        return _train_settings(dict(ctx.params), ctx)


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--dataset", default=None,
              help="Evaluate on this data set's test split (or a .npy file, all of it) "
                   "instead of the run's.")
@click.option("--n-test", default=None, type=click.IntRange(min=1),
              help="Held-out sample size.  [default: the run's]")
@click.option("--batch-size", default=None, type=click.IntRange(min=1),
              help="Evaluation batch size.  [default: the run's --eval-batch-size]")
@click.option("--trace", default=None, type=click.Choice(TRACES),
              help="Divergence estimator: exact (one Jacobian-vector product per dimension) "
                   "or hutchinson (probes drawn from a fixed seed).  [default: the run's]")
@click.option("--probes", default=None, type=click.IntRange(min=1),
              help="Hutchinson probes averaged per sample; with 2 or more the standard error "
                   "over them is reported beside the figure.  [default: the run's, 1]")
@evaluation_solver_options
@click.option("--json", "json_only", is_flag=True, help="Print only the JSON line.")
@friendly_errors
def evaluate(run_dir, dataset, n_test, batch_size, trace, probes, json_only, **solver):
    """Held-out nll (nats) or bits/dim of a trained run, with its evaluation solver or
    the trace, probes and solver given here.

    Prints a line for a person, then one JSON line. Images: the uniformly
    dequantized bits/dim (the reported figure) and, labelled, the clean
    (midpoint) figure. Toy data: the test split is drawn with seed + 1,
    a different sample from training.

    \b
    Examples:
      rnode evaluate runs/8g
      rnode evaluate runs/digits --json
      rnode evaluate runs/digits --trace hutchinson --probes 8 --rtol 1e-6 --atol 1e-6
      rnode evaluate runs/mnist --trace exact --method rk4 --step-size 0.05
      rnode evaluate runs/mine --dataset heldout.npy
    """
    _check_step_size(solver, "")
    _load_keras()
    from keras_rnode.evaluation import emit_result

    model = runs.load_model(run_dir)
    _checked(lambda: runs.choose_evaluation(model, trace, probes, **solver), "")
    config = runs.load_config(run_dir)
    x, name = runs.evaluation_data(config, dataset, n_test)
    result = runs.held_out_quality(model, x, name,
                                   batch_size or config.get("eval_batch_size", 500))
    emit_result(name, result, json_only, echo=click.echo)


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("-n", "n", default=64, show_default=True, type=click.IntRange(min=1),
              help="Number of samples.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="FILE.npy (the array) or FILE.png (scatter for 2-D, grid for images).")
@click.option("--seed", default=None, type=int, help="Seed of the base noise.")
@click.option("--trajectories", is_flag=True,
              help="Instead of samples, the paths z(t) of n held-out points from the data "
                   "(t = 0) to the noise (t = T), through the trained flow: a picture "
                   "(FILE.png, 2-D runs) or the positions (FILE.npy, (blocks * steps + 1, n, "
                   "*event_shape)).")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(min=1),
              help="With --trajectories: the pieces of each block's [0, T] a path is drawn "
                   "through.")
@friendly_errors
def sample(run_dir, n, out, seed, trajectories, steps):
    """Draw samples from a trained run (inverse flow, evaluation solver), or with
    --trajectories the paths of data points through its flow.

    Images come out as grey levels 0..L-1.

    \b
    Examples:
      rnode sample runs/8g -n 5000 --out 8g.png
      rnode sample runs/digits -n 64 --out digits.png --seed 1
      rnode sample runs/8g -n 100 --out samples.npy
      rnode sample runs/8g -n 500 --trajectories --out paths.png
    """
    if not out.endswith((".npy", ".png")):
        raise click.BadParameter(f"must end in .npy or .png, got {out!r}", param_hint="--out")
    _load_keras()
    from keras import ops

    model = runs.load_model(run_dir)
    if trajectories:
        _write_trajectories(model, runs.load_config(run_dir), n, steps, out)
        return
    samples = np.asarray(ops.convert_to_numpy(model.sample(n, seed=seed)))
    save_samples(samples, out, model.levels)
    click.echo(f"{n} samples of shape {tuple(samples.shape[1:])} written to {out}")


def _write_trajectories(model, config, n, steps, out):
    """`rnode sample --trajectories`: the paths of the run's first n held-out points."""
    from keras_rnode.trajectories import length_ratio, trajectories

    x, _ = runs.evaluation_data(config, n_test=n)
    paths = trajectories(model, x[:n], steps)
    if out.endswith(".npy"):
        np.save(out, paths)
    else:
        plot_trajectories([paths], out)
    click.echo(f"paths of {len(x[:n])} points through {len(paths) - 1} pieces written to "
               f"{out}; mean path length / mean displacement {length_ratio(paths):.3f}")


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", "out", default=None, type=click.Path(),
              help="SavedModel directory.  [default: RUN_DIR/saved_model]")
@click.option("--overwrite", is_flag=True, help="Replace an existing export.")
@friendly_errors
def export(run_dir, out, overwrite):
    """Export a trained run as a TensorFlow SavedModel with log_prob and sample endpoints.

    \b
    Examples:
      rnode export runs/8g --out exported/8g
      python -c "import tensorflow as tf; m = tf.saved_model.load('exported/8g'); \\
          print(m.log_prob(tf.zeros((1, 2))), m.sample(5))"
    """
    out = out or os.path.join(run_dir, "saved_model")
    if os.path.lexists(out) and not overwrite:
        raise click.ClickException(f"{out} exists; pass --overwrite to replace it")
    _load_keras()
    model = runs.load_model(run_dir)
    path = model.export(out, overwrite=overwrite)
    click.echo(f"SavedModel written to {path} (endpoints: log_prob, sample)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
