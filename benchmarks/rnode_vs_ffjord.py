"""RNODE against an unregularized CNF (FFJORD) under the same wall-clock budget (issue 5).

For each dataset the same architecture is trained twice, from the same
initial weights, on the same data in the same order, with the same solver:

- "rnode": `kr.RNODE([cnf], kinetic=0.01, jacobian=0.01)`;
- "unregularized": `kr.RNODE([cnf], kinetic=0, jacobian=0)`: a penalty of
  weight 0 is not integrated at all, so this is a plain FFJORD training step.

2-D data: ConcatSquashMLP 3 x 64 softplus, exact trace, dopri5 at
rtol = atol = 1e-5 for training and evaluation, adjoint gradients, Adam.
Digits (--digits): scikit-learn's 8x8 digits with 17 grey levels,
dequantized, logit transform, a small ConcatSquashConvNet, Hutchinson
trace in training and the exact trace at evaluation; the objective is
bits/dim.

The two runs are interleaved in one process, as the timing benchmarks do:
K training steps of one model, K of the other (the order alternates), then
both are evaluated, until each has spent its wall-clock budget on
training. A model's clock counts only its own training steps, and the
first step (tracing and XLA compilation) is left out and reported apart;
so a machine shared with other work slows both alike. Every K steps the
held-out NLL (5000 points of toy(name, 5000, seed=1); the digits' test
split) is recorded with the evaluation solver's NFE, together with the
mean forward and backward NFE of the last K training steps and the
wall and CPU time spent training so far: JSON lines in
benchmarks/results/<dataset>.jsonl, plots of NLL and NFE against wall
time in benchmarks/results/<dataset>.png.

RESULTS.md, "## RNODE vs unregularized (issue 5)": the final held-out NLL
of each, the forward NFE at the end, and the wall time each needs to come
within --tolerance (0.05 nats) of the unregularized model's final NLL.
Goal: RNODE >= 2x less wall time and >= 2.5x fewer forward NFE.

Run `python benchmarks/rnode_vs_ffjord.py --help`; `--quick` is a smoke run.
"""

import json
import sys
import time
from pathlib import Path

# _timing (which also makes TensorFlow Keras's default backend), also when loaded by path
sys.path.insert(0, str(Path(__file__).resolve().parent))

import click  # noqa: E402
import numpy as np  # noqa: E402
from _timing import (  # noqa: E402
    clocked_step,
    command_line,
    common_options,
    fmt_ratio,
    publish,
    ratio,
    save_figure,
    section_head,
    set_threads,
)

HEADING = "## RNODE vs unregularized (issue 5)"
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"
MODELS = ("rnode", "unregularized")
CLOCKS = {"wall": "wall time", "cpu": "CPU time"}
TOY_DEFAULT = ("8gaussians", "pinwheel", "checkerboard")
DIGITS_ALPHA = 0.05  # logit transform's alpha for 17-level digits (RealNVP's choice)


# --------------------------------------------------------------------------
# Models and data


def load(name, n_train, n_test, seed):
    """(x_train, x_test, levels): toy data drawn with seed and seed + 1, or the digits."""
    import keras_rnode as kr

    if name == "digits":
        (x_train, _), (x_test, _) = kr.datasets.digits()
        return x_train, x_test, kr.datasets.DIGITS_LEVELS
    return (kr.datasets.toy(name, n_train, seed=seed),
            kr.datasets.toy(name, n_test, seed=seed + 1), None)


def build_model(kind, event_shape, levels, args):
    """A fresh model of `kind` ('rnode' or 'unregularized'), built, not compiled."""
    import keras_rnode as kr

    solver = dict(method="dopri5", rtol=args["tol"], atol=args["tol"],
                  gradient=args["gradient"], max_steps=args["max_steps"])
    if levels:
        dynamics = kr.layers.ConcatSquashConvNet(channels=args["channels"])
        cnf = kr.layers.CNF(dynamics, trace="hutchinson", eval_trace="exact",
                            seed=args["seed"], **solver)
        extra = dict(levels=levels, logit_alpha=DIGITS_ALPHA, seed=args["seed"])
    else:
        dynamics = kr.layers.ConcatSquashMLP(hidden=args["hidden"], activation="softplus")
        cnf = kr.layers.CNF(dynamics, trace="exact", seed=args["seed"], **solver)
        extra = {}
    if kind == "rnode":
        model = kr.RNODE([cnf], kinetic=args["lam"], jacobian=args["lam"], **extra)
    else:
        # Weights 0: the penalties are not integrated at all.
        model = kr.RNODE([cnf], kinetic=0.0, jacobian=0.0, **extra)
    model.build((None, *event_shape))
    return model


def make_models(event_shape, levels, args):
    """Both models, with the same initial weights, compiled."""
    import keras

    keras.utils.set_random_seed(args["seed"])
    models = {kind: build_model(kind, event_shape, levels, args) for kind in MODELS}
    weights = models["rnode"].get_weights()
    models["unregularized"].set_weights(weights)
    for model in models.values():
        model.compile(optimizer=keras.optimizers.Adam(args["lr"]), jit_compile=args["jit"])
    return models


def use_xla(choice, levels):
    """Whether to jit-compile: --jit's choice, 'auto' resolved for this data."""
    if choice != "auto":
        return choice == "xla"
    if not levels:
        return True
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def eval_function(model, x_test, jit):
    """A compiled function: (held-out objective (nats or bits/dim), evaluation NFE)."""
    import tensorflow as tf

    x = tf.convert_to_tensor(x_test.astype(np.float32))
    cnf = model.blocks[0]

    @tf.function(jit_compile=jit)
    def evaluate(x):
        log_p = model.log_prob(x)
        objective = tf.reduce_mean(model.likelihood_loss(log_p))
        return objective, cnf.stats["nfe"].value

    def run():
        objective, nfe = evaluate(x)
        return float(objective), int(nfe)
    return run


# --------------------------------------------------------------------------
# The interleaved training


class Run:
    """One model's training: its data iterator, clock and records."""

    def __init__(self, kind, model, data, evaluate):
        self.kind, self.model, self.evaluate = kind, model, evaluate
        self.iterator = iter(data)
        self.wall = self.cpu = 0.0
        self.steps = 0
        self.compile_s = None
        self.window = []  # logs of the steps since the last record
        self.records = []
        self.failed = None

    def step(self):
        # train_on_batch returns floats, so the step is done when it returns.
        clocked_step(self, lambda batch: self.model.train_on_batch(batch, return_dict=True),
                     next(self.iterator))

    def elapsed(self, clock):
        """Training time so far on `clock` ('wall' or 'cpu')."""
        return self.wall if clock == "wall" else self.cpu

    def record(self, dataset):
        eval_s = time.perf_counter()
        objective, eval_nfe = self.evaluate()
        eval_s = time.perf_counter() - eval_s
        mean = {k: float(np.mean([w[k] for w in self.window])) for k in self.window[0]}
        self.window = []
        row = {
            "dataset": dataset, "model": self.kind, "step": self.steps,
            "wall_s": round(self.wall, 3), "cpu_s": round(self.cpu, 3),
            "nll": objective, "eval_nfe": eval_nfe, "eval_s": round(eval_s, 3),
            "nfe_forward": mean.get("nfe"), "nfe_backward": mean.get("backward_nfe"),
            "loss": mean.get("loss"), "kinetic": mean.get("kinetic"),
            "jacobian": mean.get("jacobian"),
        }
        self.records.append(row)
        return row


def train_pair(dataset, models, x_train, x_test, args, log):
    """Interleave the two runs until each has trained for args['budget_s'] seconds."""
    from keras_rnode.datasets import make_dataset

    runs = {}
    for kind, model in models.items():
        data = make_dataset(x_train, args["batch"], seed=args["seed"], repeat=True)
        runs[kind] = Run(kind, model, data, eval_function(model, x_test, args["jit"]))
    for run in runs.values():  # the first step traces and compiles: off the clock
        run.step()
        log(run.record(dataset))
    order = list(MODELS)
    while True:
        active = [runs[k] for k in order
                  if runs[k].elapsed(args["clock"]) < args["budget_s"] and not runs[k].failed]
        if not active:
            break
        for run in active:
            for _ in range(args["eval_every"]):
                run.step()
                if run.failed or run.elapsed(args["clock"]) >= args["budget_s"]:
                    break
            log(run.record(dataset))
        order.reverse()
    return runs


# --------------------------------------------------------------------------
# Summary and plots


def first_time_within(records, target, clock):
    """Training time (on `clock`) of the first record whose NLL is <= target, or None."""
    for r in records:
        if r["nll"] <= target:
            return r[f"{clock}_s"]
    return None


def nfe_note(rnode, unreg, clock, threshold=1.2):
    """A sentence on when the forward NFE of the two runs came apart (records by step)."""
    by_step = {r["step"]: r["nfe_forward"] for r in rnode}
    paired = [r for r in unreg[1:] if r["step"] in by_step]
    # The first evaluation from which the unregularized NFE stays above threshold x RNODE's.
    apart = None
    for r in paired:
        if r["nfe_forward"] > threshold * by_step[r["step"]]:
            apart = apart or r
        else:
            apart = None
    # The first record is the compile step from the zero-initialized flow: left out.
    lo_u = min(r["nfe_forward"] for r in unreg[1:] or unreg)
    lo_r = min(r["nfe_forward"] for r in rnode[1:] or rnode)
    text = (f"forward NFE per step, lowest -> end: unregularized {lo_u:.0f} -> "
            f"{unreg[-1]['nfe_forward']:.0f}, RNODE {lo_r:.0f} -> {rnode[-1]['nfe_forward']:.0f}; ")
    if apart is None:
        return text + (f"the unregularized NFE was not above {threshold:g}x RNODE's at the "
                       f"last evaluations ({unreg[-1]['step']} steps).")
    return text + (f"the unregularized NFE stays above {threshold:g}x RNODE's from step "
                   f"{apart['step']} of {unreg[-1]['step']} ({apart[f'{clock}_s']:.0f} s) on.")


def summarize(dataset, runs, tolerance, clock):
    rn, un = runs["rnode"].records, runs["unregularized"].records
    target = un[-1]["nll"] + tolerance
    t_rnode, t_unreg = first_time_within(rn, target, clock), first_time_within(un, target, clock)

    def last(records, key):
        return records[-1][key]

    return {
        "dataset": dataset, "target": target, "tolerance": tolerance,
        "nfe_note": nfe_note(rn, un, clock),
        "t_rnode": t_rnode, "t_unreg": t_unreg,
        "time_ratio": ratio(t_unreg, t_rnode),
        "budget_ratio": ratio(un[-1][f"{clock}_s"], t_rnode),
        "nfe_ratio": ratio(last(un, "nfe_forward"), last(rn, "nfe_forward")),
        "models": {
            kind: {
                "steps": run.steps, "wall_s": run.wall, "cpu_s": run.cpu,
                "compile_s": run.compile_s, "failed": run.failed,
                "nll": last(run.records, "nll"), "best_nll": min(r["nll"] for r in run.records),
                "nfe_forward": last(run.records, "nfe_forward"),
                "nfe_backward": last(run.records, "nfe_backward"),
                "eval_nfe": last(run.records, "eval_nfe"),
                "step_ms": 1e3 * run.elapsed(clock) / max(run.steps - 1, 1),
            }
            for kind, run in runs.items()
        },
    }


def plot(dataset, runs, summary, path, unit, clock):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from keras_rnode.datasets import TOY_NAMES, toy_entropy

    colors = {"rnode": "tab:blue", "unregularized": "tab:orange"}
    fig, (ax_nll, ax_nfe) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, run in runs.items():
        t = [r[f"{clock}_s"] for r in run.records]
        ax_nll.plot(t, [r["nll"] for r in run.records], "o-", ms=3, color=colors[kind],
                    label=kind)
        ax_nfe.plot(t, [r["nfe_forward"] for r in run.records], "o-", ms=3, color=colors[kind],
                    label=f"{kind}, forward")
        ax_nfe.plot(t, [r["nfe_backward"] for r in run.records], "--", color=colors[kind],
                    alpha=0.6, label=f"{kind}, backward")
    ax_nll.axhline(summary["target"], color="grey", lw=0.8, ls=":",
                   label=f"unregularized final + {summary['tolerance']:g}")
    entropy = toy_entropy(dataset) if dataset in TOY_NAMES else None
    if entropy is not None:
        ax_nll.axhline(entropy, color="black", lw=0.8, ls="--", label="entropy (lower bound)")
    finals = [r["nll"] for run in runs.values() for r in run.records[len(run.records) // 3:]]
    if finals:  # the early, very high values would squash the interesting part
        top = max(finals) + 0.5 * (max(finals) - min(finals) + 0.1)
        low = min(finals + ([entropy] if entropy is not None else []))
        ax_nll.set_ylim(low - 0.05 * (top - low), top)
    ax_nll.set(xlabel=f"training {CLOCKS[clock]} [s]", ylabel=f"held-out {unit}",
               title=f"{dataset}: held-out {unit}")
    ax_nfe.set(xlabel=f"training {CLOCKS[clock]} [s]", ylabel="NFE per training step",
               title=f"{dataset}: function evaluations")
    for ax in (ax_nll, ax_nfe):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, dpi=110)


def report(args, summaries, wall_s):
    lines = section_head(HEADING, args["command"], "keras")
    add = lines.append
    add(f"- Setup: 2-D data: ConcatSquashMLP {' x '.join(map(str, args['hidden']))} softplus "
        f"(last layer zero at start), one CNF block, exact trace; digits: ConcatSquashConvNet "
        f"{args['channels']}, Hutchinson trace (exact at evaluation), levels 17, logit alpha "
        f"{DIGITS_ALPHA}. dopri5 rtol = atol = {args['tol']:g} for training and evaluation, "
        f"{args['gradient']} gradients, Adam lr {args['lr']:g}, batch {args['batch']}, "
        f"{_modes(args)}, TensorFlow threads {args['threads']}. "
        f"RNODE: lambda_K = lambda_J = {args['lam']:g}; unregularized: 0 and the regularizer "
        f"states not integrated. Same initial weights, data order and seed ({args['seed']}). "
        f"Held-out: {args['n_test']} points of toy(name, {args['n_test']}, seed="
        f"{args['seed'] + 1}) (digits: the test split), evaluated every {args['eval_every']} "
        f"steps.")
    clock = CLOCKS[args["clock"]]
    add(f"- Budget: {args['budget_s']:g} s of training {clock} per run, the two runs "
        f"interleaved in one process (K steps each in turn); the first step (trace and "
        f"compile) and the evaluations are off the clock. "
        + ("With one TensorFlow thread a step's CPU time is its wall time on an idle machine, "
           "and it does not stretch when other work shares the cores. "
           if args["clock"] == "cpu" else "")
        + f"Whole run {wall_s / 60:.1f} min. "
        f"Records: `{args['out']}/<dataset>.jsonl`, plots `{args['out']}/<dataset>.png`.")
    add("")
    add("| dataset | model | steps | ms / step | final held-out NLL | best | forward NFE "
        "(end) | backward NFE (end) | eval NFE (end) | time to target [s] |")
    add("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in summaries:
        for kind in MODELS:
            m = s["models"][kind]
            t = s["t_rnode"] if kind == "rnode" else s["t_unreg"]
            failed = f" ({m['failed']})" if m["failed"] else ""
            add(f"| {s['dataset']} | {kind}{failed} | {m['steps']} | {m['step_ms']:.0f} "
                f"| {m['nll']:.3f} | {m['best_nll']:.3f} | {m['nfe_forward']:.0f} "
                f"| {m['nfe_backward']:.0f} | {m['eval_nfe']} "
                f"| {'not reached' if t is None else f'{t:.0f}'} |")
    add("")
    add("Target: the unregularized model's final held-out NLL + "
        f"{args['tolerance']:g} (nats; bits/dim for digits). Time to target: training {clock} "
        f"at the first evaluation at or below it. Goals: RNODE >= 2x less time, "
        f">= 2.5x fewer forward NFE.")
    add("")
    add(f"| dataset | target | {clock}: unregularized / RNODE to target | unregularized "
        "budget / RNODE to target | forward NFE at the end: unregularized / RNODE |")
    add("|---|---:|---:|---:|---:|")
    for s in summaries:
        add(f"| {s['dataset']} | {s['target']:.3f} | {fmt_ratio(s['time_ratio'])} "
            f"| {fmt_ratio(s['budget_ratio'])} | {fmt_ratio(s['nfe_ratio'])} |")
    add("")
    for s in summaries:
        add(f"- {s['dataset']}: {s['nfe_note']}")
    missed = [s["dataset"] for s in summaries
              if not ((s["time_ratio"] or 0) >= 2 and (s["nfe_ratio"] or 0) >= 2.5)]
    if missed:
        add(f"- Missed on {', '.join(missed)}, as measured. The regularizers pay off through "
            f"the NFE gap, and the gap only opens once the unregularized dynamics grow "
            f"complex (the step noted above): the goals are about the later part of "
            f"training, which a {args['budget_s']:g}-s budget on this machine reaches only "
            f"just, if at all.")
    add("")
    return "\n".join(lines)


def _shown(path):
    """A path relative to the repository when it is inside it, for the report."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(HERE.parent))
    except ValueError:
        return str(path)


def _modes(args):
    modes = {d: "XLA" if x else "graph mode" for d, x in args["jit_by_dataset"].items()}
    if len(set(modes.values())) == 1:
        return next(iter(modes.values()))
    return ", ".join(f"{m} for {d}" for d, m in modes.items())


# --------------------------------------------------------------------------


def _int_tuple(ctx, param, value):
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter("a comma-separated list of integers, e.g. 64,64,64") from None
    if not out or min(out) < 1:
        raise click.BadParameter("a comma-separated list of positive integers")
    return out


def _names(ctx, param, value):
    from keras_rnode.datasets import TOY_NAMES

    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in TOY_NAMES]
    if bad:
        raise click.BadParameter(f"unknown {bad}; choose from {', '.join(TOY_NAMES)}")
    return names


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--datasets", "names", default=",".join(TOY_DEFAULT), show_default=True,
              callback=_names, help="Comma-separated 2-D toy data sets.")
@click.option("--digits", is_flag=True, help="Also train on scikit-learn's 8x8 digits.")
@click.option("--budget-s", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Training wall time per run in seconds (default 120; 8 with --quick).")
@click.option("--clock", type=click.Choice(sorted(CLOCKS)), default="wall", show_default=True,
              help="What the budget and the time to target count: the training steps' wall "
                   "time, or their CPU time (steady on a shared machine with --threads 1).")
@click.option("--eval-every", type=click.IntRange(1), default=None,
              help="K: training steps between held-out evaluations (default 50; 3 with --quick).")
@click.option("--batch", type=click.IntRange(1), default=None,
              help="Training batch (default 512; 64 with --quick).")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--lam", type=float, default=0.01, show_default=True,
              help="RNODE's lambda_K = lambda_J.")
@click.option("--tol", type=float, default=1e-5, show_default=True,
              help="dopri5 rtol = atol, training and evaluation.")
@click.option("--gradient", type=click.Choice(["adjoint", "direct"]), default="adjoint",
              show_default=True)
@click.option("--hidden", default="64,64,64", show_default=True, callback=_int_tuple,
              help="Hidden widths of the 2-D dynamics.")
@click.option("--channels", default="32,32", show_default=True, callback=_int_tuple,
              help="Hidden channels of the digits' conv dynamics.")
@click.option("--n-train", type=click.IntRange(1), default=50_000, show_default=True,
              help="Training points of each 2-D data set (toy(name, n, seed)).")
@click.option("--n-test", type=click.IntRange(1), default=None,
              help="Held-out points (default 5000; 500 with --quick).")
@click.option("--tolerance", type=float, default=0.05, show_default=True,
              help="How close to the unregularized final NLL counts as reaching it.")
@click.option("--jit", type=click.Choice(["auto", "xla", "graph"]), default="auto",
              show_default=True,
              help="XLA (jit_compile) or graph mode. auto: XLA for 2-D data; for the digits "
                   "XLA only on a GPU (on the CPU, XLA's convolution gradients made a digits "
                   "step ~15x slower than graph mode).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder of the JSON lines and plots (default benchmarks/results; a "
                   "temporary-looking benchmarks/results/quick with --quick).")
@common_options(HEADING,
                quick="Smoke run: tiny budget and data; RESULTS.md not written unless --results.",
                no_write="Only print the summary.")
def main(names, digits, budget_s, clock, eval_every, batch, lr, lam, tol, gradient, hidden, channels,
         n_train, n_test, tolerance, jit, out, quick, results, no_write, threads, seed):
    """Train RNODE and an unregularized CNF side by side under one wall-clock budget."""
    threads_label = set_threads(threads)
    started = time.perf_counter()
    args = dict(
        command=command_line(), budget_s=budget_s or (8.0 if quick else 120.0), clock=clock,
        eval_every=eval_every or (3 if quick else 50), batch=batch or (64 if quick else 512),
        lr=lr, lam=lam, tol=tol, gradient=gradient, hidden=hidden, channels=channels,
        n_train=min(n_train, 2000) if quick else n_train, n_test=n_test or (500 if quick else 5000),
        tolerance=tolerance, jit=jit, jit_by_dataset={}, threads=threads_label, seed=seed,
        max_steps=1000)
    out = Path(out) if out else (DEFAULT_OUT / "quick" if quick else DEFAULT_OUT)
    args["out"] = _shown(out)
    datasets = list(names) + (["digits"] if digits else [])

    summaries = []
    for dataset in datasets:
        x_train, x_test, levels = load(dataset, args["n_train"], args["n_test"], seed)
        if quick and levels:
            x_train, x_test = x_train[:256], x_test[:32]
        click.echo(f"{dataset}: compiling and training 2 x {args['budget_s']:g} s ...", err=True)
        args["jit_by_dataset"][dataset] = use_xla(jit, levels)
        models = make_models(tuple(x_train.shape[1:]), levels,
                             dict(args, jit=args["jit_by_dataset"][dataset]))
        out.mkdir(parents=True, exist_ok=True)
        jsonl = out / f"{dataset}.jsonl"
        with jsonl.open("w") as f:
            f.write(json.dumps({"config": {k: v for k, v in args.items() if k != "command"},
                                "dataset": dataset, "command": args["command"]}) + "\n")

            def log(row, f=f):
                f.write(json.dumps(row) + "\n")
                f.flush()
                click.echo(f"  {row['model']:>13} step {row['step']:5d}  {row['wall_s']:7.1f} s wall "
                           f"{row['cpu_s']:7.1f} s CPU  "
                           f"nll {row['nll']:8.4f}  nfe {row['nfe_forward']:.0f}/"
                           f"{row['nfe_backward']:.0f}", err=True)

            runs = train_pair(dataset, models, x_train, x_test,
                              dict(args, jit=args["jit_by_dataset"][dataset]), log)
            summary = summarize(dataset, runs, tolerance, clock)
            f.write(json.dumps({"summary": summary}) + "\n")
        unit = "bits/dim" if levels else "NLL [nats]"
        plot(dataset, runs, summary, out / f"{dataset}.png", unit, clock)
        summaries.append(summary)

    section = report(args, summaries, time.perf_counter() - started)
    publish(section, results, quick, no_write)


if __name__ == "__main__":
    main()
