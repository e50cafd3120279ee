"""The error norm at evaluation: "per_sample" against "rms" on trained models (issue 26.4).

Under the RMS norm one hard sample among many easy ones has its error
averaged away (its error grows with the batch, diffrax#213); the
per-sample norm holds every sample to the tolerance, which costs steps
wherever the samples of a batch differ. This measures that cost where it
matters: the held-out evaluation of trained models.

For each data set a model is trained with

    rnode train --dataset D --steps S --seed 0 --quiet --out RUNS/D

(or taken from RUNS/D where a run is there already) and its test split is
evaluated with keras_rnode.evaluation.log_prob_batches at the default
evaluation batch, 500, with dopri5 at rtol = atol = 1e-5, once with
error_norm="rms" and once with "per_sample" (model.set_evaluation). Per
data set and norm: the NFE per batch (the mean over batches, summed over
blocks; the same on every repeat), the wall time per batch (the median
over repeats, the two norms interleaved, each after a first call that
traces), and the held-out NLL (nats; bits/dim for the digits, uniform
dequantization), with the change per_sample - rms, and each sample's
error of log p against a tighter solve (dopri5 at 1e-6, per-sample norm):
its largest and its mean over the test split. Results go to
benchmarks/results/error_norm.json and a section of RESULTS.md.

    python benchmarks/error_norm.py                  # trains into runs/error_norm
    python benchmarks/error_norm.py --runs /tmp/x --repeats 3
    python benchmarks/error_norm.py --quick          # 8gaussians, 50 steps, nothing written
"""

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# _timing (which also makes TensorFlow Keras's default backend), also when loaded by path
sys.path.insert(0, str(Path(__file__).resolve().parent))

import click  # noqa: E402
import numpy as np  # noqa: E402
from _timing import common_options, command_line, publish, section_head  # noqa: E402

HEADING = "## Error norm at evaluation: per_sample against rms (issue 26.4)"
JSON = Path(__file__).resolve().parent / "results" / "error_norm.json"
STEPS = {"8gaussians": 600, "checkerboard": 600, "digits": 300}
NORMS = ("rms", "per_sample")


def train(dataset, steps, run_dir):
    """Train `dataset` into run_dir with `rnode train` unless a model is there; the command."""
    command = ["rnode", "train", "--dataset", dataset, "--steps", str(steps), "--seed", "0",
               "--quiet", "--out", str(run_dir)]
    if not (run_dir / "model.keras").is_file():
        subprocess.run(command, check=True)
    return " ".join(command)


def measure(run_dir, batch_size, tol, reference_tol, repeats):
    """{norm: {nfe, seconds_per_batch, nll, bpd?, status, error of log p against a tighter
    per-sample solve (max and mean over samples)}} and the per-sample log p change."""
    from keras_rnode import runs
    from keras_rnode.evaluation import log_prob_batches
    from keras_rnode.layers.transforms import bits_per_dim

    model = runs.load_model(run_dir)
    x, _ = runs.evaluation_data(runs.load_config(str(run_dir)))
    batches = math.ceil(len(x) / batch_size)

    def evaluate(norm, tol=tol):
        model.set_evaluation(method="dopri5", rtol=tol, atol=tol, error_norm=norm)
        start = time.perf_counter()
        log_p, nfe, status = log_prob_batches(model, x, batch_size)
        return log_p, nfe, status, (time.perf_counter() - start) / batches

    for norm in NORMS:
        evaluate(norm)  # traces and compiles, off the clock
    seconds = {norm: [] for norm in NORMS}
    out = {}
    for i in range(repeats):
        for norm in NORMS if i % 2 == 0 else NORMS[::-1]:
            log_p, nfe, status, per_batch = evaluate(norm)
            seconds[norm].append(per_batch)
            out[norm] = {"log_p": log_p, "nfe": nfe, "status": status}
    reference = evaluate("per_sample", reference_tol)[0]
    result = {"n_test": int(len(x)), "batches": batches}
    for norm in NORMS:
        error = np.abs(out[norm]["log_p"] - reference)
        entry = {"nfe": out[norm]["nfe"], "seconds_per_batch": statistics.median(seconds[norm]),
                 "nll": float(-np.mean(out[norm]["log_p"])), "status": out[norm]["status"],
                 "max_error_log_p": float(np.max(error)), "mean_error_log_p": float(np.mean(error))}
        if model.levels:
            entry["bpd"] = float(np.mean(bits_per_dim(out[norm]["log_p"],
                                                      math.prod(model.event_shape),
                                                      model.levels)))
        result[norm] = entry
    result["mean_abs_delta_log_p"] = float(np.mean(np.abs(out["per_sample"]["log_p"]
                                                          - out["rms"]["log_p"])))
    return result


def table(results):
    """The RESULTS.md table: each figure as rms / per_sample (their ratio or change)."""
    lines = ["| data | test points | NFE per batch (x) | s per batch (x) | held-out NLL "
             "(change) | error of log p, max (mean) |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        rms, per = r["rms"], r["per_sample"]
        unit, key = ("bits/dim", "bpd") if "bpd" in rms else ("nats", "nll")
        nfe, secs = (rms["nfe"], per["nfe"]), (rms["seconds_per_batch"],
                                              per["seconds_per_batch"])
        lines.append(
            f"| {name} | {r['n_test']} | {nfe[0]:.1f} / {nfe[1]:.1f} ({nfe[1] / nfe[0]:.2f}) "
            f"| {secs[0]:.2f} / {secs[1]:.2f} ({secs[1] / secs[0]:.2f}) "
            f"| {rms[key]:.4f} / {per[key]:.4f} {unit} ({per[key] - rms[key]:+.1e}) "
            f"| {rms['max_error_log_p']:.1e} ({rms['mean_error_log_p']:.0e}) / "
            f"{per['max_error_log_p']:.1e} ({per['mean_error_log_p']:.0e}) nats |")
    return lines


def reading(results):
    """The table in words, from its numbers (so that a rerun rewrites it too)."""
    nfe = [r["per_sample"]["nfe"] / r["rms"]["nfe"] for r in results.values()]
    shift = max(abs(r["per_sample"]["nll"] - r["rms"]["nll"]) for r in results.values())
    worst = "; ".join(f"{name} {r['rms']['max_error_log_p']:.1e} -> "
                      f"{r['per_sample']['max_error_log_p']:.1e}" for name, r in results.items())
    return [f"Per-sample costs {min(nfe):.2f}x to {max(nfe):.2f}x the evaluations of the RMS "
            f"here; the held-out NLL moves by at most {shift:.1e} nats. What changes is the "
            f"worst sample: the largest error of one sample's log p (nats), rms -> "
            f"per_sample: {worst}."]


@click.command()
@click.option("--runs", "runs_dir", type=click.Path(file_okay=False), default="runs/error_norm",
              show_default=True, help="Where the trained runs are, or are trained (one per data "
                                      "set, reused when there).")
@click.option("--datasets", default=",".join(STEPS), show_default=True,
              help="Comma-separated data sets (training steps: " + ", ".join(
                  f"{k} {v}" for k, v in STEPS.items()) + ").")
@click.option("--batch-size", type=click.IntRange(min=1), default=500, show_default=True,
              help="Evaluation batch (rnode's default).")
@click.option("--tol", type=float, default=1e-5, show_default=True,
              help="rtol = atol of the evaluation dopri5.")
@click.option("--reference-tol", type=float, default=1e-6, show_default=True,
              help="rtol = atol of the per-sample solve each norm's log p is measured "
                   "against (float32 resolves down to 9.5e-7).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed evaluations per norm, interleaved.")
@common_options(HEADING, quick="8gaussians trained 50 steps, one repeat; nothing written.",
                no_write="Print the table only (no RESULTS.md, no JSON).", threads=None)
def main(runs_dir, datasets, batch_size, tol, reference_tol, repeats, quick, results,
         no_write):
    """Evaluate trained models with both error norms; NFE, time and NLL of each."""
    names = ["8gaussians"] if quick else [d.strip() for d in datasets.split(",") if d.strip()]
    unknown = [d for d in names if d not in STEPS]
    if unknown:
        raise click.BadParameter(f"unknown data sets {unknown}; known: {list(STEPS)}")
    if quick:
        runs_dir, repeats = os.path.join(runs_dir, "quick"), 1
    measured, commands = {}, {}
    for name in names:
        run_dir = Path(runs_dir) / name
        commands[name] = train(name, 50 if quick else STEPS[name], run_dir)
        measured[name] = measure(run_dir, batch_size, tol, reference_tol, repeats)
        click.echo(f"{name}: " + json.dumps({k: measured[name][k] for k in NORMS}), err=True)
    lines = section_head(HEADING, command_line(), "keras", "tensorflow")
    lines += [f"- Training: `{c}`" for c in commands.values()]
    lines += [f"- Evaluation: the run's test split, batch {batch_size}, dopri5 rtol = atol = "
              f"{tol:g}, trace as the run's; time per batch the median of {repeats} "
              "interleaved evaluations after one that traces; the error of log p against "
              f"dopri5 at {reference_tol:g} with the per-sample norm, over the samples.", ""]
    lines += table(measured) + [""] + reading(measured)
    publish("\n".join(lines) + "\n", results, quick, no_write)
    if not (quick or no_write):
        JSON.parent.mkdir(parents=True, exist_ok=True)
        JSON.write_text(json.dumps({"command": command_line(), "training": commands,
                                    "batch_size": batch_size, "tol": tol,
                                    "reference_tol": reference_tol, "repeats": repeats,
                                    "results": measured}, indent=2) + "\n")
        click.echo(f"written to {JSON}", err=True)


if __name__ == "__main__":
    main()
