"""Particle paths of an RNODE beside an unregularized flow (issue 15): the README's picture.

Trains two `rnode train --dataset 8gaussians --steps N` runs that differ
only in the regularizer weights, RNODE's lambda_K = lambda_J = 0.01 (the
default) and 0 (unregularized), from the same seed (the same initial
weights and batches). Then the same held-out points are carried through
both trained flows (`keras_rnode.trajectories`, what `rnode sample
--trajectories` draws) and drawn side by side into
benchmarks/results/trajectories.png, each panel with its mean path length
over mean displacement (1 for straight paths), held-out NLL and evaluation
NFE; the numbers go to RESULTS.md. Run `python benchmarks/trajectories.py
--help`; `--quick` is a smoke run.
"""

import json
import sys
import tempfile
from pathlib import Path

# _timing (which also makes TensorFlow Keras's default backend), also when loaded by path
sys.path.insert(0, str(Path(__file__).resolve().parent))

import click  # noqa: E402

import _timing  # noqa: E402

HEADING = "## Particle paths: RNODE beside an unregularized flow (issue 15)"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "trajectories.png"
MODELS = {"RNODE": ("0.01", "0.01"), "unregularized": ("0", "0")}


def train_run(out, kinetic, jacobian, steps, seed):
    """`rnode train` on 8gaussians, every option at its default but these; its metrics."""
    from keras_rnode.cli import main

    main(["train", "--dataset", "8gaussians", "--steps", str(steps), "--kinetic", kinetic,
          "--jacobian", jacobian, "--seed", str(seed), "--out", str(out), "--quiet"],
         standalone_mode=False)
    return json.loads((out / "metrics.json").read_text())


def report(rows, args):
    """The RESULTS.md section."""
    lines = _timing.section_head(HEADING, _timing.command_line(), "keras")
    lines.append(
        f"- Setup: `rnode train --dataset 8gaussians --steps {args['steps']} --seed "
        f"{args['seed']}` with `--kinetic K --jacobian J`, every other option at its default "
        f"(ConcatSquashMLP 64 x 64 x 64, exact trace, dopri5 1e-5, batch 512); TensorFlow "
        f"threads: {args['threads']}. Paths: the first {args['points']} points of the "
        f"held-out split, {args['path_steps']} pieces of [0, T] each solved with the run's "
        "evaluation solver. Length ratio: mean path length / mean displacement (1 for "
        "straight paths).")
    lines += ["", "| model | lambda_K = lambda_J | length ratio | held-out NLL | eval NFE | "
                  "train NFE (mean) | training [s] |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {MODELS[name][0]} | {row['ratio']:.3f} | {row['nll']:.3f} | "
                     f"{row['eval_nfe']:.0f} | {row['train_nfe']:.1f} | {row['seconds']:.0f} |")
    lines += ["", f"![particle paths, RNODE beside unregularized]({args['figure']})"]
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--steps", default=600, show_default=True, type=click.IntRange(min=1),
              help="Training steps of each run.")
@click.option("--points", default=300, show_default=True, type=click.IntRange(min=1),
              help="Held-out points whose paths are drawn.")
@click.option("--path-steps", default=20, show_default=True, type=click.IntRange(min=1),
              help="Pieces of [0, T] a path is drawn through.")
@click.option("--out", default=str(DEFAULT_OUT), show_default=True,
              type=click.Path(dir_okay=False), help="The picture (PNG).")
@click.option("--runs", default=None, type=click.Path(file_okay=False),
              help="Keep the two run directories here.  [default: a temporary directory]")
@_timing.common_options(HEADING, quick="Smoke run: 10 steps, 50 points.",
                        no_write="Print the section only.")
def main(steps, points, path_steps, out, runs, quick, results, no_write, threads, seed):
    """Train RNODE and an unregularized flow on 8gaussians; draw their particle paths."""
    if quick:
        steps, points = 10, 50
    threads = _timing.set_threads(threads)
    from keras_rnode import runs as run_dirs
    from keras_rnode.plots import plot_trajectories
    from keras_rnode.trajectories import length_ratio, trajectories

    with tempfile.TemporaryDirectory() as tmp:
        where = Path(runs or tmp)
        rows, panels, titles = {}, [], []
        for name, (kinetic, jacobian) in MODELS.items():
            run = where / name.lower()
            metrics = train_run(run, kinetic, jacobian, steps, seed)
            model = run_dirs.load_model(run)
            x, _ = run_dirs.evaluation_data(run_dirs.load_config(run), n_test=points)
            paths = trajectories(model, x, path_steps)
            rows[name] = {"ratio": length_ratio(paths), "nll": metrics["test"]["nll"],
                          "eval_nfe": metrics["test"]["nfe"],
                          "train_nfe": metrics["train"]["nfe"],
                          "seconds": metrics["train_seconds"]}
            panels.append(paths)
            weights = f"$\\lambda_K = \\lambda_J = {kinetic}$"
            titles.append(f"{name} ({weights})\nlength / displacement {rows[name]['ratio']:.3f}, "
                          f"NLL {rows[name]['nll']:.3f}, eval NFE {rows[name]['eval_nfe']:.0f}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    plot_trajectories(panels, str(out), titles)
    figure = Path(out).resolve()
    results_dir = Path(results or _timing.DEFAULT_RESULTS).resolve().parent
    args = {"steps": steps, "seed": seed, "threads": threads, "points": points,
            "path_steps": path_steps,
            "figure": figure.relative_to(results_dir) if figure.is_relative_to(results_dir)
            else figure}
    _timing.publish(report(rows, args), results, quick, no_write)


if __name__ == "__main__":
    main()
