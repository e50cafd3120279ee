"""Learning per step: keras-rnode against the PyTorch reference, side by side (issue 17).

Both sides train the same model on the same data, in the same batch
order, from the same seed: one CNF block, ConcatSquash MLP 64-64-64
softplus, Gaussian Hutchinson trace (one probe per sample and solve),
dopri5 at rtol = atol = 1e-5, lambda_K = lambda_J = 0.01, Adam 1e-3,
batch 512, training points toy(name, n_train, seed) (100k as `rnode
train`), batches from one seeded permutation per epoch.

- "keras": keras-rnode as `rnode train --trace hutchinson` builds and compiles it
  (models.factory.build_model; direct gradients, `rnode train --jit auto`'s
  choice (XLA on TensorFlow and JAX), the package's default initialization,
  or --init for an ablation). TensorFlow unless KERAS_BACKEND says otherwise:
  `KERAS_BACKEND=jax python benchmarks/plateau.py --sides keras` checks the
  learning per step on another backend.
- "torch": benchmarks/reference_torch.py (PyTorch + torchdiffeq, the
  released code's way: PyTorch's default initialization,
  odeint_adjoint, the regularizers out of error control).

The two are interleaved in one process, --eval-every steps each in
turn, so that a machine shared with other work slows both alike; each
side's clock (wall and process CPU time) counts only its own training
steps, its first step (tracing and XLA compilation) left out. After every
--eval-every steps, off the clock, the held-out NLL (nats) of 2000 points
of toy(name, 2000, seed + 1) with the exact trace and dopri5 at 1e-5.
A side stops at its target (3.0 nats on 8gaussians, 3.80 on
checkerboard) plus --after-target steps, or at --steps.

Records: JSON lines in benchmarks/results/plateau_<dataset>.jsonl (a
config line, one line per evaluation, a summary line), the figure
benchmarks/results/plateau.png (NLL against steps and against training
time, NFE against steps). Run `python benchmarks/plateau.py --help`;
`--quick` is a smoke run (a few steps, into a temporary folder); `--across
,_s1,_s2` tabulates recorded seeds (steps to target, time ratios, the
paired NLL gap) and their medians, and draws them all into
plateau_across.png.
"""

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import click  # noqa: E402
import numpy as np  # noqa: E402
from _timing import (  # noqa: E402  (makes TensorFlow the backend)
    clocked_step,
    command_line,
    machine,
    save_figure,
)

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"
TARGETS = {"8gaussians": 3.0, "checkerboard": 3.80}
SIDES = ("keras", "torch")
COLORS = {"keras": "tab:blue", "torch": "tab:orange"}  # both figures
HIDDEN = (64, 64, 64)

# --init (keras side): the package default, or the dense dynamics re-drawn in
# NumPy for the ablation. Each is (hidden kernels, hidden biases, last layer):
# kernels "glorot" (Glorot uniform) or "fan_in" (U +-1/sqrt(fan_in), PyTorch's
# Linear), or "fan_in" for the first layer only ("first") or all but it
# ("not_first"); biases "zero" or "fan_in"; gates and hyper-biases always U(-1, 1)
# except in a zeroed last layer; last layer "all" (every parameter zero:
# f == 0), "kernel" (only the kernel zero: f starts as a drift in t) or
# "none" (drawn like the hidden layers).
INITS = {
    "old": ("glorot", "zero", "all"),          # the package default before issue 17
    "lead": ("fan_in", "fan_in", "kernel"),    # the lead
    "torch": ("fan_in", "fan_in", "none"),     # the reference's: nothing zeroed
    "bias": ("glorot", "fan_in", "all"),       # old + hidden biases
    "drift": ("glorot", "zero", "kernel"),     # old + a drift in t at the start
    "kernels": ("fan_in", "zero", "all"),      # old + PyTorch-sized hidden kernels
    "bias_drift": ("glorot", "fan_in", "kernel"),
    "lead_zero": ("fan_in", "fan_in", "all"),  # the lead, but f == 0 at the start
    # old + the first layer's kernel PyTorch-sized: the package default since
    # issue 17 (here drawn in NumPy)
    "first": ("first", "zero", "all"),
    "not_first": ("not_first", "zero", "all"), # old + every hidden kernel but the first's
}


# --------------------------------------------------------------------------
# Data


def load(name, n_train, n_test, seed):
    from keras_rnode.datasets import toy

    return toy(name, n_train, seed=seed), toy(name, n_test, seed=seed + 1)


def batches(x, batch, seed):
    """Batches of `batch` rows forever: epoch e is the permutation of a generator seeded (seed, e)."""
    epoch = 0
    while True:
        order = np.random.default_rng((seed, epoch)).permutation(len(x))
        for i in range(0, len(order) - batch + 1, batch):
            yield x[order[i:i + batch]]
        epoch += 1


# --------------------------------------------------------------------------
# The two sides


def reinit(dynamics, init, seed):
    """Re-draw a dynamics net's weights per INITS[init] with NumPy (the ablation).

    Dense and conv blocks alike: fan_in is the product of the kernel's
    shape but its last axis (PyTorch's for Linear and Conv2d).
    """
    kernels, biases, last = INITS[init]
    rng = np.random.default_rng(seed)
    blocks = dynamics.blocks
    for i, block in enumerate(blocks):
        shape = tuple(block.kernel.shape)
        fan_in, fan_out = math.prod(shape[:-1]), shape[-1]
        is_last = i == len(blocks) - 1
        if is_last and last == "all":
            for w in block.weights:
                w.assign(np.zeros(w.shape, "float32"))
            continue
        fan_in_sized = {"fan_in": True, "glorot": False, "first": i == 0,
                        "not_first": i > 0}[kernels]
        bound = (1 / math.sqrt(fan_in) if fan_in_sized
                 else math.sqrt(6 / (fan_in + math.prod(shape[:-2]) * fan_out)))
        kernel = rng.uniform(-bound, bound, shape)
        if is_last and last == "kernel":
            kernel = np.zeros_like(kernel)
        bias = (np.zeros(fan_out) if biases == "zero"
                else rng.uniform(-1, 1, fan_out) / math.sqrt(fan_in))
        block.kernel.assign(kernel.astype("float32"))
        block.bias.assign(bias.astype("float32"))
        for name in ("gate_kernel", "gate_bias", "hyper_bias"):
            if hasattr(block, name):  # the squash blocks' time maps
                getattr(block, name).assign(rng.uniform(-1, 1, fan_out).astype("float32"))


class KerasSide:
    """keras-rnode built and compiled as `rnode train` does, with a Hutchinson trace."""

    name = "keras"

    def __init__(self, x_test, args):
        import keras

        from keras_rnode import backend
        from keras_rnode.models.factory import build_model
        from keras_rnode.solvers.settings import SolverSettings

        keras.utils.set_random_seed(args["seed"])
        tol = args["tol"]
        model = build_model(
            (2,), None, hidden=HIDDEN, blocks=1,
            regularizers={"kinetic": args["lam"], "jacobian": args["lam"]},
            logit_alpha=None, seed=args["seed"],
            solver=SolverSettings(rtol=tol, atol=tol, gradient=args["gradient"]),
            eval_solver=SolverSettings(rtol=tol, atol=tol),
            trace="hutchinson", eval_trace="exact", noise="gaussian")
        model.build((None, 2))
        if args["init"] != "default":
            reinit(model.blocks[0].dynamics, args["init"], args["seed"])
        model.compile(optimizer=keras.optimizers.Adam(args["lr"], epsilon=args["adam_epsilon"]),
                      jit_compile=backend.jit_by_default(conv=False))
        self.model, self.x_test = model, x_test

    def step(self, batch):
        logs = self.model.train_on_batch(batch, return_dict=True)
        return {"loss": logs["loss"], "nfe": logs["nfe"],
                "backward_nfe": logs.get("backward_nfe")}

    def evaluate(self):
        from keras_rnode.evaluation import log_prob_batches

        log_p, nfe, _ = log_prob_batches(self.model, self.x_test, len(self.x_test),
                                         strict=False)
        return float(-log_p.mean()), int(nfe)


class TorchSide:
    """benchmarks/reference_torch.py's Reference."""

    name = "torch"

    def __init__(self, x_test, args):
        import reference_torch

        self.ref = reference_torch.build(2, hidden=HIDDEN, seed=args["seed"],
                                         kinetic=args["lam"], jacobian=args["lam"],
                                         tol=args["tol"], lr=args["lr"])
        self.x_test = x_test

    def step(self, batch):
        return self.ref.train_step(batch)

    def evaluate(self):
        nll = self.ref.nll(self.x_test)
        return nll, self.ref.eval_nfe


class Run:
    """One side's training: its batches, clocks and records."""

    def __init__(self, side, data, dataset, target):
        self.side, self.data, self.dataset, self.target = side, data, dataset, target
        self.steps = 0
        self.wall = self.cpu = 0.0
        self.compile_s = None
        self.window, self.records = [], []
        self.reached = None  # the record at which the target was first met
        self.failed = None

    def step(self):
        clocked_step(self, self.side.step, next(self.data))

    def record(self):
        nll, eval_nfe = self.side.evaluate()

        def mean(key):
            values = [w[key] for w in self.window if w.get(key) is not None]
            return float(np.mean(values)) if values else None

        row = {"dataset": self.dataset, "side": self.side.name, "step": self.steps,
               "wall_s": round(self.wall, 3), "cpu_s": round(self.cpu, 3), "nll": nll,
               "eval_nfe": eval_nfe, "loss": mean("loss"), "nfe_forward": mean("nfe"),
               "nfe_backward": mean("backward_nfe")}
        self.window = []
        self.records.append(row)
        if self.reached is None and nll <= self.target:
            self.reached = row
        return row


def compare(dataset, args, log):
    """Train both sides on `dataset`, interleaved; returns {side: Run}."""
    x_train, x_test = load(dataset, args["n_train"], args["n_test"], args["seed"])
    target = args["targets"][dataset]
    makers = {"keras": KerasSide, "torch": TorchSide}
    runs = {s: Run(makers[s](x_test, args), batches(x_train, args["batch"], args["seed"]),
                   dataset, target) for s in args["sides"]}
    for run in runs.values():
        log(run.record())  # the initial model, step 0
    order = list(runs)

    def done(run):
        if run.failed or run.steps >= args["steps"]:
            return True
        return run.reached is not None and run.steps >= run.reached["step"] + args["after_target"]

    while not all(done(r) for r in runs.values()):
        for name in order:
            run = runs[name]
            if done(run):
                continue
            for _ in range(args["eval_every"]):
                run.step()
                if run.failed:
                    break
            log(run.record())
        order.reverse()
    return runs


# --------------------------------------------------------------------------
# Summary, figure


def summarize(dataset, runs, target):
    out = {"dataset": dataset, "target": target, "sides": {}}
    for name, run in runs.items():
        r, trained = run.reached, run.records[1:]
        per_step = run.steps - 1  # the first step is off the clock
        out["sides"][name] = {
            "steps": run.steps, "failed": run.failed, "compile_s": run.compile_s,
            "final_nll": run.records[-1]["nll"], "best_nll": min(x["nll"] for x in run.records),
            "steps_to_target": r and r["step"], "wall_to_target": r and r["wall_s"],
            "cpu_to_target": r and r["cpu_s"],
            "ms_per_step_wall": 1e3 * run.wall / max(per_step, 1),
            "ms_per_step_cpu": 1e3 * run.cpu / max(per_step, 1),
            "nfe_forward": float(np.mean([x["nfe_forward"] for x in trained])) if trained else None,
            "nfe_backward": (float(np.mean([x["nfe_backward"] for x in trained]))
                             if trained and trained[0]["nfe_backward"] is not None else None),
        }
    k, t = out["sides"].get("keras"), out["sides"].get("torch")
    if k and t and k["steps_to_target"] and t["steps_to_target"]:
        out["step_ratio"] = k["steps_to_target"] / t["steps_to_target"]
        out["wall_ratio"] = k["wall_to_target"] / t["wall_to_target"]
        out["cpu_ratio"] = k["cpu_to_target"] / t["cpu_to_target"]
    return out


def plot(all_runs, summaries, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"keras": "keras-rnode (TF, XLA)", "torch": "PyTorch + torchdiffeq reference"}
    fig, axes = plt.subplots(len(all_runs), 3, figsize=(14, 3.8 * len(all_runs)), squeeze=False)
    for row, (dataset, runs) in zip(axes, all_runs.items()):
        target = summaries[dataset]["target"]
        for name, run in runs.items():
            rec = run.records
            steps = [r["step"] for r in rec]
            row[0].plot(steps, [r["nll"] for r in rec], "o-", ms=3, color=COLORS[name],
                        label=labels[name])
            row[1].plot([r["wall_s"] for r in rec], [r["nll"] for r in rec], "o-", ms=3,
                        color=COLORS[name], label=f"{labels[name]}, wall")
            row[1].plot([r["cpu_s"] for r in rec], [r["nll"] for r in rec], ":",
                        color=COLORS[name], alpha=0.7, label=f"{labels[name]}, CPU")
            row[2].plot(steps[1:], [r["nfe_forward"] for r in rec[1:]], "o-", ms=3,
                        color=COLORS[name], label=f"{name}, forward")
            if rec[-1]["nfe_backward"] is not None:
                row[2].plot(steps[1:], [r["nfe_backward"] for r in rec[1:]], "--",
                            color=COLORS[name], alpha=0.6, label=f"{name}, backward")
        for ax in row[:2]:
            ax.axhline(target, color="grey", lw=0.8, ls=":", label=f"target {target:g}")
            values = [r["nll"] for run in runs.values() for r in run.records]
            ax.set_ylim(min(values + [target]) - 0.1, min(max(values), target + 2.5))
            ax.set_ylabel("held-out NLL [nats]")
        row[0].set(xlabel="training steps", title=f"{dataset}: held-out NLL (exact trace)")
        row[1].set(xlabel="training time [s]", title=f"{dataset}: against training time")
        row[2].set(xlabel="training steps", ylabel="NFE per training step",
                   title=f"{dataset}: function evaluations")
        for ax in row:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    save_figure(fig, path)


def table(summaries):
    lines = ["| data set | side | steps to target | wall to target [s] | CPU to target [s] "
             "| ms / step (wall, CPU) | forward / backward NFE (mean) | final NLL |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in summaries.values():
        for name, m in s["sides"].items():
            reach = ("not reached" if m["steps_to_target"] is None else
                     f"{m['steps_to_target']} | {m['wall_to_target']:.0f} | {m['cpu_to_target']:.0f}")
            if m["steps_to_target"] is None:
                reach += " | - | -"
            back = "-" if m["nfe_backward"] is None else f"{m['nfe_backward']:.0f}"
            lines.append(f"| {s['dataset']} ({s['target']:.2f}) | {name} | {reach} "
                         f"| {m['ms_per_step_wall']:.0f}, {m['ms_per_step_cpu']:.0f} "
                         f"| {m['nfe_forward']:.0f} / {back} | {m['final_nll']:.3f} |")
        if "step_ratio" in s:
            lines.append(f"| {s['dataset']} | keras / torch | {s['step_ratio']:.2f}x "
                         f"| {s['wall_ratio']:.2f}x | {s['cpu_ratio']:.2f}x | | | |")
    return "\n".join(lines)


def read_record(out, tag, dataset):
    """The JSON lines of plateau<tag>_<dataset>.jsonl in `out`; a clear error if it is missing."""
    path = out / f"plateau{tag}_{dataset}.jsonl"
    if not path.exists():
        raise click.ClickException(f"no record {path.name} in {out} (tag {tag!r})")
    return [json.loads(line) for line in path.open()]


def nll_gap(records):
    """Mean held-out NLL, keras minus torch, over the steps both sides evaluated (step 0 left out).

    Where the step at which a slowly creeping curve first crosses a target
    varies by hundreds of steps between draws, this paired gap is the
    steadier measure of which side learns more per step (negative: keras).
    """
    by_side = {}
    for r in records:
        if "side" in r and r["step"] > 0:
            by_side.setdefault(r["side"], {})[r["step"]] = r["nll"]
    keras, torch = by_side.get("keras", {}), by_side.get("torch", {})
    shared = sorted(set(keras) & set(torch))
    return float(np.mean([keras[s] - torch[s] for s in shared])) if shared else None


def across(out, tags, names):
    """Steps to target and time ratios per seed from recorded runs, and their medians.

    A side that never reached the target counts as infinitely many steps
    (and time), so a median never hides a miss.
    """
    def cell(value, fmt):
        return "not reached" if math.isinf(value) else "-" if math.isnan(value) else fmt(value)

    lines = ["| data set | seed | keras steps | torch steps | steps ratio | wall ratio "
             "| CPU ratio | NLL gap keras - torch [nats] |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    steps, ratio = (lambda v: f"{v:.0f}"), (lambda v: f"{v:.2f}x")
    curves = {}
    for dataset in names:
        table_rows = []
        for tag in tags:
            rows = read_record(out, tag, dataset)
            config = rows[0]["config"]
            curves.setdefault(dataset, []).append((config["seed"], rows))
            first = {}
            for r in rows:
                if "side" in r and r["nll"] <= config["targets"][dataset]:
                    first.setdefault(r["side"], r)
            inf = {"step": math.inf, "wall_s": math.inf, "cpu_s": math.inf}
            k, t = first.get("keras", inf), first.get("torch", inf)
            gap = nll_gap(rows)
            table_rows.append([config["seed"], k["step"], t["step"]]
                              + [k[key] / t[key] if math.isfinite(t[key]) else math.nan
                                 for key in ("step", "wall_s", "cpu_s")]
                              + [math.nan if gap is None else gap])
        if len(table_rows) > 1:
            table_rows.append(["median", *np.median(np.array([r[1:] for r in table_rows],
                                                             dtype=float), axis=0)])
        for seed, ks, ts, sr, wr, cr, gap in table_rows:
            lines.append(f"| {dataset} | {seed} | {cell(ks, steps)} | {cell(ts, steps)} "
                         f"| {cell(sr, ratio)} | {cell(wr, ratio)} | {cell(cr, ratio)} "
                         f"| {cell(gap, '{:+.3f}'.format)} |")
    return "\n".join(lines), curves


def plot_across(curves, path):
    """Held-out NLL against steps and against CPU time, every recorded seed, both sides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"keras": "keras-rnode", "torch": "PyTorch reference"}
    fig, axes = plt.subplots(len(curves), 2, figsize=(11, 3.8 * len(curves)), squeeze=False)
    for row, (dataset, runs) in zip(axes, curves.items()):
        target = runs[0][1][0]["config"]["targets"][dataset]
        for seed, rows in runs:
            for side in SIDES:
                rec = [r for r in rows if r.get("side") == side and r["step"] > 0]
                if not rec:
                    continue
                label = labels[side] if seed == runs[0][0] else None
                for ax, key in zip(row, ("step", "cpu_s")):
                    xs, ys = [r[key] for r in rec], [r["nll"] for r in rec]
                    ax.plot(xs, ys, lw=1, color=COLORS[side], alpha=0.8, label=label)
                    ax.annotate(str(seed), (xs[-1], ys[-1]), xytext=(3, 2),
                                textcoords="offset points", fontsize=7, color=COLORS[side])
        seeds = ", ".join(str(seed) for seed, _ in runs)
        top = max(r["nll"] for _, rows in runs for r in rows if r.get("step", 0) > 0)
        for ax, xlabel in zip(row, ("training steps", "training CPU time [s]")):
            ax.axhline(target, color="grey", lw=0.8, ls=":", label=f"target {target:g}")
            ax.set_ylim(target - 0.25, min(top + 0.05, target + 1.5))
            ax.set(xlabel=xlabel, ylabel="held-out NLL [nats]",
                   title=f"{dataset}: seeds {seeds}, each labelled at its end")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    save_figure(fig, path)


class _Recorded:
    """A finished run read back from its JSON lines (what plot() reads)."""

    def __init__(self, records):
        self.records = records


def replot(out, tag, names):
    all_runs, summaries = {}, {}
    for dataset in names:
        rows = read_record(out, tag, dataset)
        summaries[dataset] = next(r["summary"] for r in rows if "summary" in r)
        sides = {}
        for r in rows:
            if "side" in r:
                sides.setdefault(r["side"], []).append(r)
        all_runs[dataset] = {k: _Recorded(v) for k, v in sides.items()}
    plot(all_runs, summaries, out / f"plateau{tag}.png")
    click.echo(table(summaries))
    click.echo(f"records and figure in {out}")


@click.command()
@click.option("--datasets", default="8gaussians,checkerboard", show_default=True,
              help="Comma-separated toy data sets (targets: "
                   + ", ".join(f"{k} {v}" for k, v in TARGETS.items()) + ").")
@click.option("--sides", default="keras,torch", show_default=True,
              help="Which to train: keras, torch, or keras,torch (both).")
@click.option("--init", type=click.Choice(["default", *INITS]), default="default",
              show_default=True, help="keras side's initialization (ablation); default: "
              "the package's; the others are described at INITS in this file (old: "
              "the package's before issue 17; torch: the reference's).")
@click.option("--steps", default=5000, show_default=True, type=click.IntRange(min=1),
              help="At most this many training steps per side.")
@click.option("--after-target", default=0, show_default=True, type=click.IntRange(min=0),
              help="Steps a side trains on after reaching its target.")
@click.option("--target", "target_override", type=float, default=None,
              help="One target for every data set (default: per data set).")
@click.option("--eval-every", default=100, show_default=True, type=click.IntRange(min=1),
              help="Training steps between held-out evaluations (off the clock).")
@click.option("--batch", default=512, show_default=True, type=click.IntRange(min=1),
              help="Training batch size, both sides.")
@click.option("--n-train", default=100000, show_default=True, type=click.IntRange(min=1),
              help="Training points drawn from the toy distribution.")
@click.option("--n-test", default=2000, show_default=True, type=click.IntRange(min=1),
              help="Held-out points (drawn with seed + 1).")
@click.option("--lr", default=1e-3, show_default=True, type=float,
              help="Adam's learning rate, both sides.")
@click.option("--adam-epsilon", default=1e-7, show_default=True, type=float,
              help="keras side's Adam epsilon (Keras's default; PyTorch's is 1e-8, added "
                   "after the bias correction where Keras adds it before).")
@click.option("--lam", default=0.01, show_default=True, type=float,
              help="lambda_K = lambda_J.")
@click.option("--tol", default=1e-5, show_default=True, type=float,
              help="dopri5 rtol = atol, training and evaluation.")
@click.option("--gradient", default="direct", show_default=True,
              type=click.Choice(["direct", "adjoint"]),
              help="keras side's gradient (`rnode train`'s default: direct); the "
                   "reference always uses odeint_adjoint, as the paper's code does.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=0),
              help="TensorFlow and PyTorch threads (0: their defaults; JAX keeps its own).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seeds both sides' weights, the data and the batch order.")
@click.option("--quick", is_flag=True,
              help="Smoke run of about a minute: 8gaussians, 4 steps a side, 2 per evaluation, "
                   "4096 training and 500 held-out points (overriding those options); written "
                   "to --out if given, else to a new temporary folder.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for plateau<tag>_<dataset>.jsonl and plateau<tag>.png; default "
                   "benchmarks/results, which holds the committed records (a full run there "
                   "replaces them), except for --quick, which defaults to a new temporary "
                   "folder.")
@click.option("--tag", default="", help="Suffix for the output names (plateau<tag>_...).")
@click.option("--across", "across_tags", default=None,
              help="Comma-separated tags of recorded runs in --out (e.g. ',_s1,_s2': seed 0's "
                   "tag is the empty one): "
                   "print steps to target, time ratios and the NLL gap per seed, and medians, "
                   "and draw every seed's curves into --out's plateau_across.png; trains nothing.")
@click.option("--plot-only", is_flag=True,
              help="Redraw plateau<tag>.png and the table from --out's JSON lines, no training.")
def main(datasets, sides, init, steps, after_target, target_override, eval_every, batch,
         n_train, n_test, lr, adam_epsilon, lam, tol, gradient, threads, seed, quick, out, tag,
         across_tags, plot_only):
    """Train keras-rnode and the PyTorch reference side by side; NLL vs steps and time."""
    names = [d for d in datasets.split(",") if d]
    if out is None:
        out = tempfile.mkdtemp(prefix="plateau-quick-") if quick else DEFAULT_OUT
    out = Path(out)
    if across_tags is not None:
        text, curves = across(out, [t.strip() for t in across_tags.split(",")], names)
        if curves:
            plot_across(curves, out / "plateau_across.png")
        return click.echo(text)
    if plot_only:
        return replot(out, tag, names)
    if quick:
        names, steps, eval_every, n_train, n_test = ["8gaussians"], 4, 2, 4096, 500
    sides = tuple(s for s in sides.split(",") if s)
    if not set(sides) <= set(SIDES):
        raise click.BadParameter(f"sides must be among {SIDES}", param_hint="--sides")
    from keras_rnode.datasets.toys import TOY_NAMES

    unknown = [d for d in names if d not in TOY_NAMES]
    if unknown:
        raise click.BadParameter(f"unknown toy data set(s) {', '.join(unknown)}; valid: "
                                 f"{', '.join(TOY_NAMES)}", param_hint="--datasets")
    targets = {d: target_override if target_override is not None else TARGETS.get(d)
               for d in names}
    if None in targets.values():
        raise click.BadParameter("give --target for data sets without one", param_hint="--target")
    if threads:
        import tensorflow as tf
        import torch

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        torch.set_num_threads(threads)
    args = dict(steps=steps, after_target=after_target, eval_every=eval_every, batch=batch,
                n_train=n_train, n_test=n_test, lr=lr, adam_epsilon=adam_epsilon, lam=lam, tol=tol,
                gradient=gradient,
                seed=seed, sides=sides, init=init, targets=targets)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(args, command=command_line(), machine=machine(), threads=threads,
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  keras_backend=os.environ.get("KERAS_BACKEND"))
    all_runs, summaries = {}, {}
    for dataset in names:
        path = out / f"plateau{tag}_{dataset}.jsonl"
        with path.open("w") as f:
            f.write(json.dumps({"config": config}) + "\n")

            def log(row):
                f.write(json.dumps(row) + "\n")
                f.flush()
                click.echo(f"{row['dataset']:>12} {row['side']:>5} step {row['step']:5d}  "
                           f"nll {row['nll']:.3f}  wall {row['wall_s']:7.1f} s  cpu "
                           f"{row['cpu_s']:7.1f} s  nfe {row['nfe_forward'] or 0:.0f}/"
                           f"{'-' if row['nfe_backward'] is None else round(row['nfe_backward'])}"
                           f"  eval nfe {row['eval_nfe']}")

            runs = compare(dataset, args, log)
            summaries[dataset] = summarize(dataset, runs, targets[dataset])
            f.write(json.dumps({"summary": summaries[dataset]}) + "\n")
        all_runs[dataset] = runs
    plot(all_runs, summaries, out / f"plateau{tag}.png")
    click.echo(table(summaries))
    click.echo(f"records and figure in {out}")


if __name__ == "__main__":
    main()
