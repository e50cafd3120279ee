"""The `rnode` command line: train, evaluate, sample and export RNODE models.

Every command works on a run directory, which `rnode train` fills with

    model.keras    the trained model (keras.saving.load_model)
    config.json    every option of the run, and what was derived from them
    metrics.json   final training metrics, held-out nll or bits/dim, NFE, times
    history.json   the per-epoch training metrics
    density.png    2-D data: the data beside the learned density
    samples.png    images: a grid of samples

The helpers here (`load_data`, `load_model`, `evaluate_model`,
`describe_result`) are shared with scripts/evaluate_bpd.py.
"""

import functools
import json
import math
import os
import re
import shutil
import sys
import time
import weakref

import click
import numpy as np

IMAGE_DATASETS = ("digits", "mnist", "cifar10")
MODEL_FILE = "model.keras"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"
DENSITY_FILE = "density.png"
SAMPLES_FILE = "samples.png"
TOY_TEST_SIZE = 5000
EXACT_TRACE_MAX_DIM = 10  # --trace auto: exact up to this many dimensions


def _toy_names():
    from keras_rnode.datasets import TOY_NAMES

    return TOY_NAMES


# ------------------------------------------------------------------ errors --


def _one_line(err):
    """An exception as one line: Keras's call context and ANSI codes dropped."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    text = text.split("Arguments received by")[0]
    text = text.replace("Exception encountered when calling", "in")
    return " ".join(text.split()) or type(err).__name__


def friendly_errors(fn):
    """Turn the errors bad input raises into click's one-line `Error: ...`, exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except (ValueError, OSError) as err:
            raise click.ClickException(_one_line(err)) from None

    return wrapper


# -------------------------------------------------------------------- data --


def parse_hidden(text):
    """'64,64,64' -> (64, 64, 64); ValueError on anything else."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        widths = tuple(int(p) for p in parts)
    except ValueError:
        widths = ()
    if not widths or any(w < 1 for w in widths):
        raise ValueError(f"--hidden must be comma-separated positive integers such as "
                         f"64,64,64; got {text!r}")
    return widths


def check_dataset(name):
    """A toy name, an image data set, or a path to a .npy file; ValueError otherwise."""
    if name in _toy_names() or name in IMAGE_DATASETS:
        return name
    if str(name).endswith(".npy"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"data file {name} does not exist")
        return name
    raise ValueError(f"unknown dataset {name!r}; choose one of "
                     f"{', '.join(_toy_names() + IMAGE_DATASETS)}, or give a .npy file")


def is_image_dataset(name):
    return name in IMAGE_DATASETS


def _load_npy(path):
    x = np.load(path, allow_pickle=False)
    if not np.issubdtype(x.dtype, np.number) or x.ndim < 2 or len(x) < 2:
        raise ValueError(f"{path}: need a numeric array of shape (n >= 2, *event_shape), "
                         f"got dtype {x.dtype} and shape {x.shape}")
    x = x.astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        row = int(np.argwhere(bad.reshape(len(x), -1).any(axis=1))[0, 0])
        raise ValueError(f"{path} holds {int(bad.sum())} NaN or inf value(s); the first "
                         f"in row {row}")
    return x


def load_data(dataset, split, n=None, seed=0):
    """The train or test split of a data set: (x, levels).

    Toy data: `n` fresh points drawn with `seed` (train) or `seed + 1`
    (test). Images: integer arrays with `levels` grey levels, the first `n`
    if n is given. A .npy file (continuous data): the last tenth is the
    test split.
    """
    from keras_rnode import datasets

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    dataset = check_dataset(dataset)
    if dataset in _toy_names():
        n = n or (10000 if split == "train" else TOY_TEST_SIZE)
        return datasets.toy(dataset, int(n), seed=seed + (split == "test")), None
    if is_image_dataset(dataset):
        loader = getattr(datasets, dataset)
        levels = getattr(datasets, f"{dataset.upper()}_LEVELS")
        (x_train, _), (x_test, _) = loader()
        x = x_train if split == "train" else x_test
        return (x[:n] if n else x), levels
    x = _load_npy(dataset)
    cut = len(x) - max(1, len(x) // 10)
    x = x[:cut] if split == "train" else x[cut:]
    return (x[:n] if n else x), None


# ------------------------------------------------------------------- model --


def build_model(event_shape, levels, hidden, blocks, kinetic, jacobian, trace, noise,
                solver, eval_solver, eval_trace, logit_alpha, seed, architecture="single",
                layer_type=None):
    """An RNODE of `blocks` CNF blocks (MLP dynamics for flat data, conv for images).

    architecture="multiscale" (images): FFJORD's multiscale model with
    `blocks` blocks before and after each squeeze and at the last scale;
    its conv dynamics are `layer_type` ("concat", the paper's, by default).
    """
    import keras_rnode as kr

    if architecture == "multiscale":
        if len(event_shape) != 3:
            raise ValueError(f"--architecture multiscale needs images, got data of event "
                             f"shape {event_shape}")
        return kr.multiscale_rnode(
            event_shape, channels=hidden, blocks_per_scale=blocks,
            dynamics=layer_type or "concat", kinetic=kinetic, jacobian=jacobian,
            levels=levels, logit_alpha=logit_alpha if levels else None, seed=seed,
            trace=trace, noise=noise, **solver, eval_method=eval_solver["method"],
            eval_rtol=eval_solver["rtol"], eval_atol=eval_solver["atol"],
            eval_step_size=eval_solver["step_size"], eval_trace=eval_trace)
    conv = {"concat": kr.layers.ConcatConvNet,
            "concatsquash": kr.layers.ConcatSquashConvNet}[layer_type or "concatsquash"]
    cnfs = []
    for i in range(blocks):
        if len(event_shape) == 3:
            dynamics = conv(channels=hidden)
        elif len(event_shape) == 1:
            dynamics = kr.layers.ConcatSquashMLP(hidden=hidden)
        else:
            raise ValueError(f"data of event shape {event_shape} is neither flat vectors nor "
                             "(height, width, channels) images")
        cnfs.append(kr.layers.CNF(
            dynamics, trace=trace, noise=noise, **solver,
            eval_method=eval_solver["method"], eval_rtol=eval_solver["rtol"],
            eval_atol=eval_solver["atol"], eval_step_size=eval_solver["step_size"],
            eval_trace=eval_trace, seed=seed + i))
    return kr.RNODE(cnfs, kinetic=kinetic, jacobian=jacobian, levels=levels,
                    logit_alpha=logit_alpha if levels else None, seed=seed)


def load_model(path):
    """A saved RNODE from a run directory or a .keras file."""
    import keras

    import keras_rnode  # noqa: F401  (registers the classes for deserialization)

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, MODEL_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {MODEL_FILE} in {os.path.dirname(path)}: not a run "
                                    "directory (create one with `rnode train --out DIR`)")
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    return keras.saving.load_model(path, compile=False)


def load_config(run_dir):
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


# -------------------------------------------------------------- evaluation --

_EVAL_FNS = weakref.WeakKeyDictionary()


def _eval_fn(model, midpoint):
    """One compiled function per (model, midpoint): log p per sample, eval solver."""
    from keras_rnode import backend

    fns = _EVAL_FNS.setdefault(model, {})
    if midpoint not in fns:
        if midpoint:
            def fn(x):
                return model._flow(x, False, False, deterministic=True)[0]
        else:
            def fn(x):
                return model.log_prob(x, training=False)
        fns[midpoint] = backend.inference_function(model, fn)
    return fns[midpoint]


def log_prob_batches(model, x, batch_size=500, midpoint=False, strict=True):
    """log p of every row of x with the model's evaluation solver; (log_p, mean NFE, status).

    For image models `midpoint=True` dequantizes with u = 0.5 instead of
    uniform noise (the "clean" figure). A solve that stops short of T
    (max_steps, step underflow) raises a ValueError naming the batch, unless
    strict=False: then the worst status is returned.
    """
    from keras import ops

    from keras_rnode.solvers.solution import Status

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    if model.levels:
        from keras_rnode.layers.transforms import check_levels

        check_levels(x, model.levels)
    else:
        from keras_rnode.models.rnode import check_finite

        check_finite(np.asarray(x), "data")
    if tuple(x.shape[1:]) != tuple(model.event_shape):
        raise ValueError(f"the model takes events of shape {tuple(model.event_shape)}, the "
                         f"data has shape {tuple(x.shape[1:])}")
    fn = _eval_fn(model, bool(midpoint))
    out, nfes, status = [], [], Status.SUCCESS
    for start in range(0, len(x), batch_size):
        batch = np.asarray(x[start:start + batch_size], np.float32)
        out.append(ops.convert_to_numpy(fn(batch)))
        nfes.append(sum(int(b.stats["nfe"].numpy()) for b in model.blocks))
        batch_status = max(int(b.stats["status"].numpy()) for b in model.blocks)
        if strict and batch_status != Status.SUCCESS:
            raise ValueError(
                f"the evaluation solve of batch {start // batch_size} (rows {start} to "
                f"{start + len(batch) - 1}) ended with status {Status.name(batch_status)} "
                f"after {nfes[-1]} function evaluations; its log-densities would be wrong. "
                "Raise --max-steps or loosen the evaluation tolerances")
        status = max(status, batch_status)
    return np.concatenate(out), float(np.mean(nfes)), Status.name(status)


def evaluate_model(model, x, batch_size=500, midpoint=True):
    """Held-out quality of `model` on x with its evaluation solver, as a dict.

    Continuous data: "nll" (mean negative log-likelihood, nats). Images:
    "bpd" (bits/dim, uniform dequantization: the reported figure), and with
    midpoint=True "bpd_midpoint" (u = 0.5, the labelled "clean" figure);
    "nll" is then of the dequantized y in [0, 1)^D. Always "n", "nfe" (mean
    forward function evaluations per batch, summed over blocks), "status"
    and "seconds".
    """
    from keras_rnode.layers.transforms import bits_per_dim

    start = time.perf_counter()
    log_p, nfe, status = log_prob_batches(model, x, batch_size)
    result = {"n": int(len(x)), "nll": float(-np.mean(log_p))}
    if model.levels:
        dims = math.prod(model.event_shape)
        result["bpd"] = float(np.mean(bits_per_dim(log_p, dims, model.levels)))
        if midpoint:
            clean, _, _ = log_prob_batches(model, x, batch_size, midpoint=True)
            result["bpd_midpoint"] = float(np.mean(bits_per_dim(clean, dims, model.levels)))
    result.update(nfe=nfe, status=status, solver=_solver_text(model),
                  seconds=round(time.perf_counter() - start, 3))
    return result


def _solver_text(model):
    s = model.blocks[0].eval_solver
    if s["method"] == "dopri5":
        return f"dopri5 rtol={s['rtol']:g} atol={s['atol']:g}"
    return f"{s['method']} step={s['step_size']:g}"


def describe_result(name, result):
    """The line a person reads for an `evaluate_model` result."""
    what = "images" if "bpd" in result else "points"
    head = f"{name} test ({result['n']} {what}): "
    if "bpd" in result:
        head += f"{result['bpd']:.4f} bits/dim (uniform dequantization)"
        if "bpd_midpoint" in result:
            head += f", clean (midpoint) {result['bpd_midpoint']:.4f} bits/dim"
    else:
        head += f"nll {result['nll']:.4f} nats"
        if result.get("entropy") is not None:
            head += f" (the data's entropy, a floor: {result['entropy']:.4f})"
    line = f"{head}; NFE {result['nfe']:.1f} ({result['solver']}); {result['seconds']:.1f} s"
    if result["status"] != "success":
        line += f"; WARNING: solver status {result['status']}"
    return line


def emit_result(name, result, json_only):
    if not json_only:
        click.echo(describe_result(name, result))
    click.echo(json.dumps({"dataset": name, "split": "test", **result}))


# ----------------------------------------------------------------- figures --


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_density(model, x, path, batch_size=500, resolution=80):
    """2-D data: a histogram of x beside the model's density on a grid."""
    lo, hi = np.percentile(x, [0.5, 99.5], axis=0)
    pad = 0.1 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], resolution),
                         np.linspace(lo[1], hi[1], resolution))
    grid = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float32)
    # A picture: far from the data a solve may give up; show what it has.
    log_p, _, _ = log_prob_batches(model, grid, batch_size, strict=False)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    axes[0].hist2d(x[:, 0], x[:, 1], bins=resolution, range=[[lo[0], hi[0]], [lo[1], hi[1]]])
    axes[0].set_title("data")
    axes[1].pcolormesh(gx, gy, np.exp(log_p).reshape(gx.shape), shading="auto")
    axes[1].set_title("model density")
    for ax in axes:
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_samples(samples, path, levels=None):
    """Samples to .npy (the array) or .png (a scatter for 2-D, a grid for images)."""
    samples = np.asarray(samples)
    if path.endswith(".npy"):
        np.save(path, samples)
        return
    if not path.endswith(".png"):
        raise ValueError(f"--out must end in .npy or .png, got {path!r}")
    plt = _pyplot()
    if samples.ndim == 4:
        n = len(samples)
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        h, w, c = samples.shape[1:]
        canvas = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, c), np.float32)
        scale = (levels - 1) if levels else max(float(samples.max()), 1.0)
        for i, image in enumerate(samples):
            r, q = divmod(i, cols)
            canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = (
                image / scale)
        fig, ax = plt.subplots(figsize=(cols * 0.6 + 1, rows * 0.6 + 1))
        ax.imshow(canvas[..., 0] if c == 1 else np.clip(canvas, 0, 1), cmap="gray",
                  vmin=0, vmax=1)
    elif samples.ndim == 2 and samples.shape[1] == 2:
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(samples[:, 0], samples[:, 1], s=2)
        ax.set_aspect("equal")
    else:
        raise ValueError(f"cannot draw samples of shape {samples.shape[1:]} as a PNG; "
                         "use --out FILE.npy")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- commands --


def _warn_on_solver_status(model, when):
    from keras_rnode.solvers.solution import Status

    status = max(int(b.stats["status"].numpy()) for b in model.blocks)
    if status != Status.SUCCESS:
        click.echo(f"warning: in {when} the solver ended with status {Status.name(status)}; "
                   "raise --max-steps or loosen the tolerances", err=True)


CHECKPOINT_DIR = "checkpoint"
OPTIONS_FILE = "options.json"
# Options a resumed run may change: what to do on trouble, and how it shows.
RESUME_MAY_CHANGE = ("resume", "out", "quiet", "overwrite", "checkpoint_every", "on_nan",
                     "on_max_steps", "nfe_limit", "on_nfe_limit")


def _resume_options(opts):
    """With --resume, the interrupted run's options (plus the few a resume may change)."""
    if not opts["resume"]:
        return opts
    if not opts["out"]:
        raise click.UsageError("--resume needs --out RUN_DIR, the run to continue")
    path = os.path.join(opts["out"], CHECKPOINT_DIR, OPTIONS_FILE)
    if not os.path.isfile(path):
        raise click.ClickException(f"nothing to resume: {path} does not exist")
    with open(path) as f:
        saved = json.load(f)
    ctx = click.get_current_context()
    for key, value in opts.items():
        given = ctx.get_parameter_source(key) == click.core.ParameterSource.COMMANDLINE
        value = list(value) if isinstance(value, tuple) else value
        if given and key not in RESUME_MAY_CHANGE and saved.get(key) != value:
            flag = "--" + key.replace("_", "-")
            raise click.UsageError(f"--resume continues the run with its own options; "
                                   f"{flag} was {saved.get(key)!r}, drop {flag}")
    merged = {**opts, **{k: v for k, v in saved.items() if k not in RESUME_MAY_CHANGE}}
    if isinstance(merged.get("hidden"), list):
        merged["hidden"] = tuple(merged["hidden"])
    return merged


def _resume_hint(out):
    from keras_rnode.callbacks import StepBackup

    step = StepBackup.resume_step(os.path.join(out, CHECKPOINT_DIR))
    if step is None:
        return (f"no checkpoint was saved yet (--checkpoint-every); `rnode train --resume "
                f"--out {out}` starts the run again with its options")
    return f"`rnode train --resume --out {out}` continues from the checkpoint at step {step}"


def _guarded(model, opts, optimizer):
    """The optimizer, wrapped so that steps with NaN/inf (or a failed solve) are not applied."""
    from keras_rnode.optimizers import SkipBadSteps

    guard = model.solves_succeeded if opts["on_max_steps"] != "warn" else None
    return SkipBadSteps(optimizer, guard=guard)


def _fit(model, x_train, out, opts):
    """Train as the options say, checkpointing into the run directory: (history, resumed, stop)."""
    from keras_rnode import callbacks
    from keras_rnode.datasets import make_dataset
    from keras_rnode.resumable import fit_resumable

    checkpoint = os.path.join(out, CHECKPOINT_DIR)
    if not opts["resume"]:
        shutil.rmtree(checkpoint, ignore_errors=True)  # --overwrite: start over
        os.makedirs(checkpoint)
        _json_dump({k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()},
                   os.path.join(checkpoint, OPTIONS_FILE))
    steps, batch = opts["steps"], opts["batch_size"]
    # One seeded stream of batches for the whole run, so a resumed run can
    # skip exactly the batches already trained on.
    def stream(start):  # built afresh: a reused one would reshuffle differently
        return make_dataset(x_train, batch, seed=opts["seed"], repeat=True).skip(start)

    watches = [callbacks.BadSteps("skip" if opts["on_nan"] == "skip" else "stop"),
               callbacks.SolverFailures(opts["on_max_steps"])]
    if opts["nfe_limit"]:
        watches.append(callbacks.NFEWatch(opts["nfe_limit"],
                                          stop=opts["on_nfe_limit"] == "stop"))
    try:
        history, resumed = fit_resumable(
            model, stream, steps or len(x_train) // batch,
            1 if steps else (opts["epochs"] or 10), checkpoint,
            opts["checkpoint_every"] or 2**62, callbacks=watches,
            verbose=0 if opts["quiet"] else 1)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; {_resume_hint(out)}", err=True)
        raise click.exceptions.Exit(130) from None
    stop = next((w.stop_reason for w in watches if w.stop_reason), None)
    return history, resumed, stop


def _json_dump(obj, path):
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
        f.write("\n")
    os.replace(tmp, path)


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
    if value is None:
        return None
    try:
        return parse_hidden(value)
    except ValueError as err:
        raise click.BadParameter(_one_line(err)) from None


SOLVERS = click.Choice(["dopri5", "rk4", "euler"])


@main.command()
@click.option("--dataset", default="8gaussians", show_default=True, callback=_dataset_option,
              help="A 2-D toy distribution (8gaussians, pinwheel, checkerboard, 2spirals, "
                   "moons, rings, swissroll, circles), an image set (digits, mnist, cifar10), "
                   "or a .npy file of continuous data (n, *event_shape), its last tenth held out.")
@click.option("--hidden", default=None, callback=_hidden_option,
              help="Widths of the dynamics net: dense units for flat data, conv channels "
                   "for images, comma-separated.  [default: 64,64,64]")
@click.option("--blocks", default=1, show_default=True, type=click.IntRange(min=1),
              help="Number of CNF blocks, each with its own dynamics net; multiscale: "
                   "blocks before and after each squeeze, and at the last scale.")
@click.option("--architecture", default="single", show_default=True,
              type=click.Choice(["single", "multiscale"]),
              help="Images: one chain of CNF blocks, or FFJORD's multiscale model (squeeze, "
                   "factor out half the channels, repeat; the paper's for MNIST, CIFAR-10).")
@click.option("--layer-type", default=None, type=click.Choice(["concat", "concatsquash"]),
              help="Images: conv dynamics, t as an extra channel (concat) or gated by t "
                   "(concatsquash).  [default: concat multiscale, concatsquash single]")
@click.option("--kinetic", default=0.01, show_default=True, type=click.FloatRange(min=0),
              help="lambda_K, weight of the kinetic-energy regularizer.")
@click.option("--jacobian", default=0.01, show_default=True, type=click.FloatRange(min=0),
              help="lambda_J, weight of the Jacobian Frobenius-norm regularizer.")
@click.option("--method", default="dopri5", show_default=True, type=SOLVERS,
              help="Training solver; rk4 and euler need --step-size.")
@click.option("--rtol", default=1e-5, show_default=True, type=float, callback=_positive,
              help="Relative tolerance of the adaptive training solver.")
@click.option("--atol", default=1e-5, show_default=True, type=float, callback=_positive,
              help="Absolute tolerance of the adaptive training solver.")
@click.option("--step-size", default=None, type=float, callback=_positive,
              help="Step of a fixed-step training solver (the paper: rk4, 0.25).")
@click.option("--max-steps", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Bound on solver steps per solve.")
@click.option("--eval-method", default="dopri5", show_default=True, type=SOLVERS,
              help="Solver for held-out evaluation, sampling and export.")
@click.option("--eval-rtol", default=1e-5, show_default=True, type=float, callback=_positive)
@click.option("--eval-atol", default=1e-5, show_default=True, type=float, callback=_positive)
@click.option("--eval-step-size", default=None, type=float, callback=_positive,
              help="Step of a fixed-step evaluation solver.")
@click.option("--trace", default="auto", show_default=True,
              type=click.Choice(["auto", "exact", "hutchinson"]),
              help=f"Divergence estimator in training; auto: exact for flat data of at most "
                   f"{EXACT_TRACE_MAX_DIM} dimensions (the 2-D toys), hutchinson otherwise.")
@click.option("--eval-trace", default=None, type=click.Choice(["exact", "hutchinson"]),
              help="Divergence estimator at evaluation.  [default: as --trace]")
@click.option("--noise", default="gaussian", show_default=True,
              type=click.Choice(["gaussian", "rademacher"]), help="Hutchinson probe noise.")
@click.option("--gradient", default="direct", show_default=True,
              type=click.Choice(["adjoint", "direct"]),
              help="direct backpropagation through the accepted steps (faster) or adjoint (memory flat in the steps).")
@click.option("--epochs", default=None, type=click.IntRange(min=1),
              help="Passes over the training data.  [default: 10, unless --steps]")
@click.option("--steps", default=None, type=click.IntRange(min=1),
              help="Train for exactly this many optimizer steps instead of epochs.")
@click.option("--batch-size", default=512, show_default=True, type=click.IntRange(min=1))
@click.option("--eval-batch-size", default=500, show_default=True, type=click.IntRange(min=1))
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
              help="Data-parallel training on this many devices (tf.distribute."
                   "MirroredStrategy): GPUs, or the CPU split into logical devices.")
@click.option("--jit/--no-jit", default=True, show_default=True,
              help="Compile the training step with XLA (first step slow, then fast).")
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
@click.option("--on-max-steps", default="warn", show_default=True,
              type=click.Choice(["warn", "skip", "stop"]),
              help="A training solve that hits --max-steps: count and warn per epoch, skip "
                   "the step too, or stop before applying it.")
@click.option("--nfe-limit", default=None, type=click.IntRange(min=1),
              help="Warn (or, with --on-nfe-limit stop, stop) when a training step's NFE "
                   "exceeds this.")
@click.option("--on-nfe-limit", default="warn", show_default=True,
              type=click.Choice(["warn", "stop"]))
@friendly_errors
def train(**opts):
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
    import contextlib

    import keras

    start = time.perf_counter()
    opts = _resume_options(opts)
    out, name = _checked_run_dir(opts)
    # Devices must be set up before TensorFlow does any work.
    strategy = _strategy(opts["devices"], opts["batch_size"])
    if strategy is not None and opts["jit"]:
        from keras_rnode.backend.distribute import supports_jit

        if not supports_jit(strategy):
            click.echo("note: XLA cannot compile one step across logical CPU devices; "
                       "training in graph mode (--no-jit)", err=True)
            opts["jit"] = False
    toy = opts["dataset"] in _toy_names()
    x_train, levels = load_data(opts["dataset"], "train", opts["n_train"] if toy else None,
                                seed=opts["seed"])
    x_test, _ = load_data(opts["dataset"], "test", opts["n_test"], seed=opts["seed"])
    if levels and not opts["jit"]:
        from keras_rnode.backend.graph_options import avoid_addn_rewrite_race

        avoid_addn_rewrite_race()  # see there: a TensorFlow race in graph-mode image steps
    keras.utils.set_random_seed(opts["seed"])
    with strategy.scope() if strategy else contextlib.nullcontext():
        model, derived = _model_from_options(opts, tuple(x_train.shape[1:]), levels)
        lr = opts["lr"]
        if opts["warmup_steps"]:
            from keras_rnode.models.schedules import LinearWarmup

            lr = LinearWarmup(lr, opts["warmup_steps"])
        model.compile(optimizer=_guarded(model, opts, keras.optimizers.Adam(lr)),
                      jit_compile=opts["jit"])

    fit_start = time.perf_counter()
    history, resumed, stop_reason = _fit(model, x_train, out, opts)
    train_seconds = time.perf_counter() - fit_start
    history = {k: [float(v) for v in vs] for k, vs in history.items()}

    os.makedirs(out, exist_ok=True)
    partial = os.path.join(out, ".partial." + MODEL_FILE)
    model.save(partial)
    os.replace(partial, os.path.join(out, MODEL_FILE))
    if stop_reason is not None:
        _json_dump({"stopped": stop_reason, "resumed_from_step": resumed,
                    "train": {k: vs[-1] for k, vs in history.items() if vs}},
                   os.path.join(out, METRICS_FILE))
        _json_dump(history, os.path.join(out, HISTORY_FILE))
        raise click.ClickException(
            f"training stopped: {stop_reason}. {out}/{MODEL_FILE} holds the last good weights; "
            f"{_resume_hint(out)}")
    shutil.rmtree(os.path.join(out, CHECKPOINT_DIR), ignore_errors=True)

    result = evaluate_model(model, x_test, opts["eval_batch_size"])
    if toy:
        from keras_rnode.datasets import toy_entropy

        result["entropy"] = toy_entropy(opts["dataset"])
    _write_figure(model, x_test, out, opts)

    from keras_rnode import __version__

    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()}
    config.update(derived, out=out, levels=levels, event_shape=list(x_train.shape[1:]),
                  n_test=len(x_test), objective=model.objective_name, keras_rnode=__version__)
    _json_dump(config, os.path.join(out, CONFIG_FILE))
    _json_dump(history, os.path.join(out, HISTORY_FILE))
    metrics = {
        "train": {k: vs[-1] for k, vs in history.items() if vs},
        "test": result,
        "train_seconds": round(train_seconds, 3),
        "resumed_from_step": resumed,
        "wall_seconds": round(time.perf_counter() - start, 3),
    }
    _json_dump(metrics, os.path.join(out, METRICS_FILE))
    click.echo(describe_result(name, result))
    click.echo(f"run directory: {out} (trained {train_seconds:.1f} s)")


def _checked_run_dir(opts):
    """(run directory, data set name) after the checks that need no data."""
    dataset = opts["dataset"]
    name = os.path.basename(dataset) if dataset.endswith(".npy") else dataset
    out = opts["out"] or os.path.join("runs", os.path.splitext(name)[0])
    if os.path.exists(out) and not os.path.isdir(out):
        raise click.ClickException(f"--out {out} is a file, not a run directory")
    from keras_rnode.callbacks import StepBackup

    checkpoint = os.path.join(out, CHECKPOINT_DIR)
    # The options file is written as a run starts and removed when it ends well.
    interrupted = os.path.isfile(os.path.join(checkpoint, OPTIONS_FILE))
    if interrupted and not opts["resume"] and not opts["overwrite"]:
        step = StepBackup.resume_step(checkpoint) or 0
        raise click.ClickException(f"{out} holds an interrupted run (checkpoint at step "
                                   f"{step}); pass --resume to continue it or --overwrite "
                                   "to start over")
    elif (os.path.exists(os.path.join(out, MODEL_FILE)) and not opts["overwrite"]
          and not opts["resume"]):
        raise click.ClickException(f"{out} already holds a model; pass --overwrite to "
                                   "replace it, or choose another --out")
    if opts["epochs"] and opts["steps"]:
        raise click.UsageError("give --epochs or --steps, not both")
    for prefix in ("", "eval_"):
        if opts[prefix + "method"] != "dopri5" and not opts[prefix + "step_size"]:
            flag = "--" + prefix.replace("_", "-")
            raise click.UsageError(f"{flag}method {opts[prefix + 'method']} needs "
                                   f"{flag}step-size")
    return out, name


def _strategy(devices, batch_size):
    """None for one device, else a MirroredStrategy over `devices` devices."""
    if devices == 1:
        return None
    if batch_size % devices:
        raise click.UsageError(f"--batch-size {batch_size} must be divisible by --devices "
                               f"{devices}: each device takes an equal share")
    from keras_rnode.backend.distribute import mirrored_strategy

    try:
        return mirrored_strategy(devices)
    except RuntimeError as err:
        raise click.ClickException(_one_line(err)) from None


def _model_from_options(opts, event_shape, levels):
    """The RNODE that `rnode train`'s options describe, and the settings they resolve to."""
    trace = opts["trace"]
    if trace == "auto":
        flat_and_small = len(event_shape) == 1 and event_shape[0] <= EXACT_TRACE_MAX_DIM
        trace = "exact" if flat_and_small else "hutchinson"
    eval_trace = opts["eval_trace"] or trace
    if opts["noise"] == "rademacher" and "exact" in (trace, eval_trace):
        raise click.UsageError("--noise rademacher needs --trace hutchinson")
    hidden = opts["hidden"] or (64, 64, 64)
    solver = dict(method=opts["method"], rtol=opts["rtol"], atol=opts["atol"],
                  step_size=opts["step_size"], max_steps=opts["max_steps"],
                  gradient=opts["gradient"])
    eval_solver = dict(method=opts["eval_method"], rtol=opts["eval_rtol"],
                       atol=opts["eval_atol"], step_size=opts["eval_step_size"])
    model = build_model(event_shape, levels, hidden, opts["blocks"], opts["kinetic"],
                        opts["jacobian"], trace, opts["noise"], solver, eval_solver,
                        eval_trace, opts["logit_alpha"], opts["seed"],
                        architecture=opts["architecture"], layer_type=opts["layer_type"])
    return model, {"trace": trace, "eval_trace": eval_trace, "hidden": list(hidden)}


def _write_figure(model, x_test, out, opts):
    """density.png for 2-D data, samples.png for images; drop the other if a run left it."""
    event_shape = tuple(model.event_shape)
    figure = None
    if event_shape == (2,):
        figure = DENSITY_FILE
        plot_density(model, x_test, os.path.join(out, figure), opts["eval_batch_size"])
    elif len(event_shape) == 3:
        figure = SAMPLES_FILE
        from keras import ops

        save_samples(ops.convert_to_numpy(model.sample(36, seed=opts["seed"])),
                     os.path.join(out, figure),
                     model.levels)
    for stale in {DENSITY_FILE, SAMPLES_FILE} - {figure}:
        if os.path.exists(os.path.join(out, stale)):
            os.remove(os.path.join(out, stale))


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--dataset", default=None,
              help="Evaluate on this data set's test split (or a .npy file, all of it) "
                   "instead of the run's.")
@click.option("--n-test", default=None, type=click.IntRange(min=1),
              help="Held-out sample size.  [default: the run's]")
@click.option("--batch-size", default=None, type=click.IntRange(min=1),
              help="Evaluation batch size.  [default: the run's --eval-batch-size]")
@click.option("--json", "json_only", is_flag=True, help="Print only the JSON line.")
@friendly_errors
def evaluate(run_dir, dataset, n_test, batch_size, json_only):
    """Held-out nll (nats) or bits/dim of a trained run, with its evaluation solver.

    Prints a line for a person, then one JSON line. Images: the uniformly
    dequantized bits/dim (the reported figure) and, labelled, the clean
    (midpoint) figure. Toy data: the test split is drawn with seed + 1,
    a different sample from training.

    \b
    Examples:
      rnode evaluate runs/8g
      rnode evaluate runs/digits --json
      rnode evaluate runs/mine --dataset heldout.npy
    """
    model = load_model(run_dir)
    config = load_config(run_dir) if os.path.isdir(run_dir) else {}
    x, name = _evaluation_data(config, dataset, n_test)
    result = evaluate_model(model, x, batch_size or config.get("eval_batch_size", 500))
    if name in _toy_names():
        from keras_rnode.datasets import toy_entropy

        result["entropy"] = toy_entropy(name)
    emit_result(name, result, json_only)


def _evaluation_data(config, dataset, n_test):
    """(x, name) for `rnode evaluate`: the run's test split unless told otherwise."""
    if dataset is None:
        dataset = config.get("dataset")
        if dataset is None:
            raise click.UsageError("this run has no config.json; pass --dataset")
        n_test = n_test or config.get("n_test")
    else:
        dataset = check_dataset(dataset)
    if dataset.endswith(".npy") and dataset != config.get("dataset"):
        x = _load_npy(dataset)
        x = x[:n_test] if n_test else x
    else:
        x, _ = load_data(dataset, "test", n_test, seed=config.get("seed", 0))
    name = os.path.basename(dataset) if dataset.endswith(".npy") else dataset
    return x, name


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("-n", "n", default=64, show_default=True, type=click.IntRange(min=1),
              help="Number of samples.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="FILE.npy (the array) or FILE.png (scatter for 2-D, grid for images).")
@click.option("--seed", default=None, type=int, help="Seed of the base noise.")
@friendly_errors
def sample(run_dir, n, out, seed):
    """Draw samples from a trained run (inverse flow, evaluation solver).

    Images come out as grey levels 0..L-1.

    \b
    Examples:
      rnode sample runs/8g -n 5000 --out 8g.png
      rnode sample runs/digits -n 64 --out digits.png --seed 1
      rnode sample runs/8g -n 100 --out samples.npy
    """
    if not out.endswith((".npy", ".png")):
        raise click.BadParameter(f"must end in .npy or .png, got {out!r}", param_hint="--out")
    model = load_model(run_dir)
    from keras import ops

    samples = np.asarray(ops.convert_to_numpy(model.sample(n, seed=seed)))
    save_samples(samples, out, model.levels)
    click.echo(f"{n} samples of shape {tuple(samples.shape[1:])} written to {out}")


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
    model = load_model(run_dir)
    path = model.export(out, overwrite=overwrite)
    click.echo(f"SavedModel written to {path} (endpoints: log_prob, sample)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
