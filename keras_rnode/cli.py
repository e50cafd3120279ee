"""The `rnode` command line: train, evaluate, sample and export RNODE models.

Click code only: each command parses its options, calls keras_rnode.runs
and turns its errors into click's one-line `Error: ...`. `rnode train`'s
options are `TrainSettings` fields (keras_rnode.train_settings), with its
defaults; the solver's are generated from SOLVER_OPTIONS (--NAME, and
--eval-NAME for the evaluation solver), the penalty weights from
`regularizers.BUILTINS`. Choices come from modules that load without
keras, which loads in the commands that use it, so `rnode --help` answers
at once.
"""

import dataclasses
import functools
import re
import sys

import click
from click.core import ParameterSource

from keras_rnode import objectives, regularizers, runs, train_settings
from keras_rnode.actions import ACTIONS
from keras_rnode.datasets.registry import IMAGE_DATASETS, TOY_TEST_SIZE
from keras_rnode.datasets.toys import TOY_NAMES
from keras_rnode.layers.divergence import EXACT_TRACE_MAX_DIM, PROBES, TRACES
from keras_rnode.models import factory
from keras_rnode.models.conv_dynamics import CONV_DYNAMICS
from keras_rnode.quiet_import import load_keras
from keras_rnode.solvers.norms import ERROR_NORMS
from keras_rnode.solvers.settings import EVAL_PREFIX, FIXED_STEP_METHODS, GRADIENTS, METHODS
from keras_rnode.train_settings import JIT_CHOICES, flag
from keras_rnode.trajectories import STEPS as PATH_STEPS

DEFAULTS = train_settings.TrainSettings()
INT, COUNT = click.IntRange(min=1), click.IntRange(min=0)

# ------------------------------------------------------------------ errors --


def _one_line(err):
    """An exception as one line: Keras's call context and ANSI codes dropped."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    text = text.split("Arguments received by")[0]
    text = text.replace("Exception encountered when calling", "in")
    return " ".join(text.split()) or type(err).__name__


def friendly_errors(fn):
    """Bad input's errors as click's one-line `Error: ...`: conflicting options exit 2 (usage
    errors), the rest 1; Ctrl-C exits 130 and says how to go on (`runs.RunInterrupted`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as err:
            click.echo(f"\ninterrupted; {str(err) or 'nothing was written'}", err=True)
            raise click.exceptions.Exit(130) from None
        except click.ClickException:
            raise
        except runs.OptionConflict as err:
            raise click.UsageError(_one_line(err)) from None
        # ImportError: a TensorFlow-only feature asked for where TensorFlow is absent.
        except (ValueError, OSError, ImportError, runs.RunFailed) as err:
            raise click.ClickException(_one_line(err)) from None

    return wrapper


def _hidden_option(ctx, param, value):
    try:
        return train_settings.parse_widths(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


def _npy_or_png(ctx, param, value):  # checked before keras loads
    if not value.endswith((".npy", ".png")):
        raise click.BadParameter(f"must end in .npy or .png, got {value!r}")
    return value


# ---------------------------------------------------- generated options --


@dataclasses.dataclass(frozen=True)
class SolverOption:
    """A `SolverSettings` field on the command line: --NAME, and --eval-NAME where it has
    an `eval_help`. Values are checked by SolverSettings, whose errors name the flag."""

    field: str
    type: object
    help: str
    eval_help: str | None = None


SOLVER_OPTIONS = (
    SolverOption("method", click.Choice(METHODS),
                 f"Training solver; {' and '.join(FIXED_STEP_METHODS)} need --step-size.",
                 "Solver for held-out evaluation, sampling and export."),
    SolverOption("rtol", float, "Relative tolerance of the adaptive training solver.",
                 "Relative tolerance of the adaptive evaluation solver."),
    SolverOption("atol", float, "Absolute tolerance of the adaptive training solver.",
                 "Absolute tolerance of the adaptive evaluation solver."),
    SolverOption("step_size", float,
                 "Step of a fixed-step training solver (the paper: rk4, 0.25).",
                 "Step of a fixed-step evaluation solver."),
    SolverOption("error_norm", click.Choice(ERROR_NORMS),
                 "How the adaptive training solver measures a step's error: rms over the batch, "
                 "or per_sample (each sample held to the tolerances).",
                 "How the adaptive evaluation solver measures a step's error: per_sample keeps "
                 "a point's log-density independent of its batch-mates."),
    SolverOption("max_steps", INT, "Bound on solver steps per solve."),
    # Training needs a gradient; "none" is for inference.
    SolverOption("gradient", click.Choice([g for g in GRADIENTS if g != "none"]),
                 "direct backpropagation through the accepted steps (faster) or adjoint "
                 "(memory flat in the steps)."),
)


def _add_options(command, entries):
    """Add an option for each (flag, type, help, default), in order."""
    for name, kind, text, default in reversed(entries):  # decorators apply bottom-up
        command = click.option(name, default=default, show_default=default is not None,
                               type=kind, help=text)(command)
    return command


def solver_options(command):
    """Add --X for every SOLVER_OPTIONS entry, then --eval-X for those with an eval twin;
    the defaults are TrainSettings()'s solvers'."""
    entries = [(flag(o.field), o.type, o.help, getattr(DEFAULTS.solver, o.field))
               for o in SOLVER_OPTIONS]
    entries += [(flag(EVAL_PREFIX + o.field), o.type, o.eval_help,
                 getattr(DEFAULTS.eval_solver, o.field)) for o in SOLVER_OPTIONS if o.eval_help]
    return _add_options(command, entries)


def evaluation_solver_options(command):
    """Add --X for the SOLVER_OPTIONS entries with an eval twin: a trained run's evaluation
    solver, changed for one evaluation (None: the run's own)."""
    return _add_options(command, [(flag(o.field), o.type, f"{o.eval_help}  [default: the "
                                   "run's]", None) for o in SOLVER_OPTIONS if o.eval_help])


def setting(name, type=None, help=None, *aliases, **kwargs):
    """`rnode train`'s --NAME, a TrainSettings field: its default is TrainSettings()'s."""
    default = getattr(DEFAULTS, name)
    return click.option(flag(name), *aliases, default=default, type=type, help=help,
                        show_default=default is not None and default is not False, **kwargs)


def regularizer_options(command):
    """Add --NAME, the weight of each built-in penalty, by the penalty's own description."""
    return _add_options(command, [
        (flag(name), float, f"Weight of the {name} penalty, "
         f"{regularizers.get(name).__doc__.splitlines()[0]}",
         DEFAULTS.regularizers.get(name, 0.0)) for name in regularizers.BUILTINS])


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
      rnode sample runs/pinwheel -n 2000 --out runs/pinwheel-samples.png
      rnode export runs/pinwheel --out runs/pinwheel-exported
      rnode train --dataset digits --hidden 32,32 --blocks 2 --epochs 20 --out runs/digits

    Run `rnode COMMAND --help` for each command's options.
    """


@main.command()
@setting("dataset",
         help=f"A 2-D toy distribution ({', '.join(TOY_NAMES)}), an image set "
              f"({', '.join(IMAGE_DATASETS)}), or a .npy file of continuous data "
              "(n, *event_shape), its last tenth held out.")
@setting("hidden", callback=_hidden_option,
         help="Widths of the dynamics net: dense units for flat data, conv channels for "
              "images, comma-separated.  [default: "
              f"{','.join(map(str, factory.DEFAULT_HIDDEN))}; "
              f"{','.join(map(str, factory.DEFAULT_DENSE_IMAGE_HIDDEN))} dense on images]")
@setting("blocks", INT, "Number of CNF blocks, each with its own dynamics net; multiscale: "
         "blocks before and after each squeeze, and at the last scale.")
@setting("architecture", click.Choice(factory.ARCHITECTURES),
         "Images: one chain of CNF blocks with conv dynamics (single) or with dense dynamics "
         "on the flattened image (dense), or FFJORD's multiscale model (squeeze, factor out "
         "half the channels, repeat; the paper's for MNIST, CIFAR-10); auto: dense up to "
         f"{factory.DENSE_MAX_DIM} values an image (the digits), multiscale beyond.")
@setting("layer_type", click.Choice(sorted(CONV_DYNAMICS)),
         "Images: conv dynamics, t as an extra channel (concat) or gated by t (concatsquash)."
         "  [default: concat multiscale, concatsquash single]")
@setting("activation", click.Choice(factory.ACTIVATIONS), "Of the dynamics net; auto: "
         "softplus (the paper's), SiLU for flow matching (softplus nets learn slowly there).")
@regularizer_options
@setting("objective", click.Choice(train_settings.OBJECTIVE_CHOICES),
         "likelihood: solve the flow, minimize nats or bits/dim + penalties; flow-matching: "
         "regress it on straight paths to the noise, no solve (then fine-tune: --resume).")
@setting("coupling", click.Choice(objectives.COUPLINGS), "Flow matching: each point with "
         "its own noise, or the batch paired by minibatch optimal transport (straighter).")
@setting("sigma", float, "Flow matching: standard deviation of the noise around the path.")
@solver_options
@setting("trace", click.Choice(("auto", *TRACES)),
         f"Divergence estimator in training; auto: exact for flat data of at most "
         f"{EXACT_TRACE_MAX_DIM} dimensions (the 2-D toys), hutchinson otherwise.")
@setting("eval_trace", click.Choice(TRACES),
         "Divergence estimator at evaluation.  [default: as --trace]")
@setting("noise", click.Choice(PROBES), "Hutchinson probe noise.")
@setting("epochs", INT, "Passes over the training data.  [default: "
         f"{train_settings.DEFAULT_EPOCHS}, or as many as {train_settings.DEFAULT_MIN_STEPS} "
         "steps take; unless --steps]")
@setting("steps", INT, "Train for exactly this many optimizer steps instead of epochs.")
@setting("batch_size", INT, "Training batch size (the global batch, split over devices, workers).")
@setting("eval_batch_size", INT, "Batch size of the held-out evaluation and the figure.")
@setting("lr", float, "Adam learning rate.")
@setting("warmup_steps", COUNT,
         "Raise the learning rate linearly over this many steps (the paper: 1000).")
@setting("seed", COUNT,
         "Seeds weights, data order, noise; toy data is drawn with it (test: seed+1).")
@setting("n_train", INT, "Toy data: training sample size.")
@setting("n_test", INT, f"Held-out sample size.  [default: {TOY_TEST_SIZE} toy points, the "
         "whole image test split]")
@setting("logit_alpha", float, "Images: alpha of the logit transform in front of the flow.")
@setting("devices", INT, "Data-parallel training on this many devices (TF: MirroredStrategy; "
         "JAX: DataParallel): GPUs, or the CPU split into logical devices.")
@setting("workers", is_flag=True, help="Train as one worker of TF_CONFIG's cluster "
         "(MultiWorkerMirroredStrategy): every worker runs the same command, --batch-size is "
         "the global batch, worker 0 writes --out.")
@click.option("--jit", "jit", show_default=True, is_flag=False, flag_value="on",
              default=next(k for k, v in JIT_CHOICES.items() if v == DEFAULTS.jit),
              type=click.Choice(tuple(JIT_CHOICES)),
              help="Compile the training step with XLA (on: the first step slow, then fast) "
                   "or not (off: graph mode); auto: XLA for flat data and on a GPU, graph mode "
                   "for images on a CPU, where it is faster. --jit alone is on.")
@click.option("--no-jit", is_flag=True, help="The same as --jit off.")
@setting("out", click.Path(file_okay=False), "Run directory.  [default: runs/DATASET]")
@setting("overwrite", is_flag=True, help="Replace a model already in the run directory.")
@setting("quiet", None, "No progress bar.", "-q", is_flag=True)
@setting("checkpoint_every", COUNT,
         "Save a resumable checkpoint in RUN_DIR/checkpoint every N steps (0: never); an "
         "interrupted run loses at most N steps.")
@setting("resume", is_flag=True,
         help="Continue the interrupted run in --out from its last checkpoint with its "
              "options (as if uninterrupted), or finish one whose training is done; a "
              "finished run is left as it is, but a flow-matching one given --objective "
              "likelihood --steps N is fine-tuned N steps. New --eval-*, --n-test may be given.")
@setting("on_nan", click.Choice(train_settings.ON_NAN),
         "A step with a NaN or inf loss or gradient is never applied; skip it and go on, or "
         "stop (the model keeps its last good weights).")
@setting("on_max_steps", click.Choice(ACTIONS),
         "A training solve that hits --max-steps: count and warn per epoch, skip the step "
         "too, or stop before applying it.")
@setting("nfe_limit", INT, "Warn (or, with --on-nfe-limit stop, stop) when a training "
         "step's NFE exceeds this.")
@setting("on_nfe_limit", click.Choice(train_settings.ON_NFE_LIMIT),
         "What a step over --nfe-limit does: warn, or end the run at the first such step.")
@friendly_errors
def train(**options):
    """Train an RNODE model and write a run directory.

    Minimizes nats (2-D and .npy data) or bits/dim (images) plus each penalty times
    its weight, or flow matching's regression; then evaluates the held-out split
    with the evaluation solver: its quality, NFE and kinetic energy.

    \b
    Examples:
      rnode train --dataset 8gaussians --steps 1000 --out runs/8g
      rnode train --dataset checkerboard --hidden 64,64,64 --epochs 20 \\
          --kinetic 0.05 --jacobian 0.05 --out runs/checker
      rnode train --dataset mnist --hidden 64,64,64 --blocks 2 --method rk4 \\
          --step-size 0.25 --batch-size 200 --out runs/mnist
      rnode train --dataset 8gaussians --objective flow-matching --coupling ot \\
          --steps 2000 --out runs/8g-fm
      rnode train --resume --out runs/8g-fm --objective likelihood --steps 200
    """
    ctx = click.get_current_context()
    given = {name for name in options
             if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}
    settings = runs.command_line_settings(options, given)
    load_keras(seeds=True)
    report = runs.train(settings, note=functools.partial(click.echo, err=True))
    from keras_rnode.evaluation import describe_result

    click.echo(describe_result(report.name, report.test))
    done = ("finished before; nothing to resume" if report.finished_before
            else f"trained {report.train_seconds:.1f} s")
    click.echo(f"run directory: {report.out} ({done})")


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--dataset", help="Evaluate on this data set's test split (or a .npy file, all "
              "of it) instead of the run's.")
@click.option("--n-test", type=INT, help="Held-out sample size.  [default: the run's]")
@click.option("--batch-size", type=INT,
              help="Evaluation batch size.  [default: the run's --eval-batch-size]")
@click.option("--trace", type=click.Choice(TRACES),
              help="Divergence estimator: exact (one Jacobian-vector product per dimension) "
                   "or hutchinson (probes drawn from a fixed seed).  [default: the run's]")
@click.option("--probes", type=INT, help="Hutchinson probes averaged per sample; with 2 or "
              "more the standard error over them is reported beside the figure.  [default: "
              "the run's, 1]")
@evaluation_solver_options
@click.option("--kinetic/--no-kinetic", default=True, show_default=True, help="Also the "
              "flow's kinetic energy: the mean per-sample integral, by the training solver.")
@click.option("--json", "json_only", is_flag=True, help="Print only the JSON line.")
@friendly_errors
def evaluate(run_dir, dataset, n_test, batch_size, trace, probes, kinetic, json_only, **solver):
    """Held-out nll (nats) or bits/dim of a trained run, with its evaluation solver or
    the trace, probes and solver given here, and the flow's kinetic energy.

    Prints a line for a person (with the evaluation NFE), then one JSON line. Images:
    the uniformly dequantized bits/dim (the reported figure) and, labelled, the clean
    (midpoint) figure. Toy data: the test split is drawn with seed + 1.

    \b
    Examples:
      rnode evaluate runs/8g
      rnode evaluate runs/digits --trace hutchinson --probes 8 --rtol 1e-6 --atol 1e-6
      rnode evaluate runs/mnist --trace exact --method rk4 --step-size 0.05
    """
    load_keras()
    from keras_rnode.evaluation import emit_result

    name, result = runs.evaluate_run(run_dir, dataset, n_test, batch_size, trace, probes,
                                     kinetic, **solver)
    emit_result(name, result, json_only, echo=click.echo)


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("-n", "n", default=runs.SAMPLES, show_default=True, type=INT,
              help="Number of samples.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              callback=_npy_or_png,
              help="FILE.npy (the array) or FILE.png (scatter for 2-D, grid for images).")
@click.option("--seed", type=COUNT, help="Seed of the base noise.")
@click.option("--trajectories", is_flag=True,
              help="Instead of samples, the paths z(t) of n held-out points from the data "
                   "(t = 0) to the noise (t = T) through the trained flow: a picture (FILE.png, "
                   "2-D runs) or the positions (FILE.npy, (blocks * steps + 1, n, *event_shape)).")
@click.option("--steps", default=PATH_STEPS, show_default=True, type=INT,
              help="With --trajectories: the pieces of each block's [0, T] a path is drawn "
                   "through.")
@friendly_errors
def sample(run_dir, n, out, seed, trajectories, steps):
    """Draw samples from a trained run (inverse flow, evaluation solver), or with
    --trajectories the paths of data points through its flow.

    Images come out as grey levels 0..L-1.

    \b
    Examples:
      rnode sample runs/8g -n 5000 --out runs/8g-samples.png
      rnode sample runs/digits -n 64 --out runs/digits-samples.png --seed 1
      rnode sample runs/8g -n 500 --trajectories --out runs/8g-paths.png
    """
    load_keras()
    if trajectories:
        points, pieces, ratio = runs.write_trajectories(run_dir, n, out, steps)
        click.echo(f"paths of {points} points through {pieces} pieces written to {out}; "
                   f"mean path length / mean displacement {ratio:.3f}")
        return
    shape = runs.write_samples(run_dir, n, out, seed)
    click.echo(f"{n} samples of shape {shape} written to {out}")


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", "out", default=None, type=click.Path(),
              help=f"SavedModel directory.  [default: RUN_DIR/{runs.SAVED_MODEL_DIR}]")
@click.option("--overwrite", is_flag=True, help="Replace an existing export.")
@friendly_errors
def export(run_dir, out, overwrite):
    """Export a trained run as a TensorFlow SavedModel: endpoints log_prob and (exported from
    TensorFlow) sample.

    \b
    Examples:
      rnode export runs/8g --out runs/8g-exported
      python -c "import tensorflow as tf; m = tf.saved_model.load('runs/8g-exported'); \\
          print(m.log_prob(tf.zeros((1, 2))), m.sample(5))"
    """
    load_keras()
    path, endpoints = runs.export_run(run_dir, out, overwrite)
    click.echo(f"SavedModel written to {path} (endpoints: {', '.join(endpoints)})")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
