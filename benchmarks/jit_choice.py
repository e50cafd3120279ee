"""XLA or graph mode: the measurement behind `rnode train --jit auto` (issue 15).

One training step of the model `rnode train --dataset 8gaussians` builds,
of the one `rnode train --dataset digits` builds (dense dynamics), and of
the conv one `--architecture single` gives the digits, every other option
at its default, each compiled under XLA (jit_compile=True) and in graph
mode. The settings are the command's own (`kr.TrainSettings()` with the
model's options), the model and its optimizer `runs.compiled_model`'s; a step is the model's
`train_step` under `tf.function(jit_compile=...)`, as Keras's fit runs it,
on the next batch of a seeded stream of the training data. Both modes of a
data set step the same model (the same weights and optimizer state).

Timing as in benchmarks/solver.py (helpers in benchmarks/_timing.py): each
variant traced, compiled and called twice first, then interleaved rounds
in one process with the order shuffled each round; medians of wall and
CPU time. Run `python benchmarks/jit_choice.py --help`; `--quick` is a
smoke run.
"""

import sys
from pathlib import Path

# _timing (which also makes TensorFlow Keras's default backend), also when loaded by path
sys.path.insert(0, str(Path(__file__).resolve().parent))

import click  # noqa: E402

import _timing  # noqa: E402

HEADING = "## XLA or graph mode for `rnode train --jit auto` (issue 15)"
# What is timed: a label, and the `rnode train` options of its model (TrainSettings fields).
MODELS = {
    "8gaussians": {"dataset": "8gaussians"},
    "digits, dense (default)": {"dataset": "digits"},
    "digits, conv": {"dataset": "digits", "architecture": "single"},
}
MODES = {"xla": True, "graph": False}


def step_variants(label, options, batch_size, seed):
    """{(label, mode): one training step} and what the model is, for `rnode train OPTIONS`."""
    import tensorflow as tf

    import keras_rnode as kr
    from keras_rnode import runs
    from keras_rnode.datasets.pipeline import make_dataset
    from keras_rnode.datasets.registry import load_data
    from keras_rnode.datasets.toys import TOY_NAMES

    settings = kr.TrainSettings(**options, seed=seed,
                                **({"batch_size": batch_size} if batch_size else {}))
    dataset = settings.dataset
    x, levels = load_data(dataset, "train", settings.n_train if dataset in TOY_NAMES else None,
                          seed=seed)
    event_shape = tuple(x.shape[1:])
    run = settings.resolved(event_shape)
    model = runs.compiled_model(run, event_shape, levels)
    model.build((None, *event_shape))
    model.optimizer.build(model.trainable_variables)
    batches = iter(make_dataset(x, run.batch_size, seed=seed, repeat=True))
    variants = {}
    for mode, jit in MODES.items():
        step = tf.function(model.train_step, jit_compile=jit, reduce_retracing=True)
        variants[label, mode] = lambda step=step: (step(next(batches))["loss"],)
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in options.items())
    about = {"options": flags, "event_shape": event_shape, "batch": run.batch_size, "auto": run.jit,
             "hidden": run.hidden, "trace": run.trace, "solver": run.solver.describe(),
             "gradient": run.solver.gradient, "params": model.count_params(),
             "architecture": run.architecture}
    return variants, about


def report(timings, compile_s, failures, abouts, args):
    """The RESULTS.md section."""
    lines = _timing.section_head(HEADING, _timing.command_line(), "keras")
    batches = ", ".join(f"{dataset} {about['batch']}" for dataset, about in abouts.items())
    lines.append(
        f"- Setup: the model and optimizer of `rnode train OPTIONS` with every other option "
        f"at its default (batch {batches}); "
        "one training step = the model's train_step under tf.function, jit_compile on (XLA) "
        "or off (graph mode), as Keras's fit runs it, both modes stepping the same model. "
        f"Medians over {args['repeats']} interleaved rounds, after two warm-up calls each; "
        f"TensorFlow threads: {args['threads']}.")
    for dataset, about in abouts.items():
        lines.append(f"- {dataset}: `rnode train {about['options']}`, architecture "
                     f"{about['architecture']}, events {about['event_shape']}, hidden "
                     f"{about['hidden']}, "
                     f"{about['trace']} trace, {about['solver']}, {about['gradient']} gradient, "
                     f"{about['params']} weights; `--jit auto` picks "
                     f"{'XLA' if about['auto'] else 'graph mode'} here.")
    lines += ["", "| data | mode | first call [s] | wall ms / step | CPU ms / step | "
                  "wall: XLA / graph |", "|---|---|---:|---:|---:|---:|"]
    for dataset in abouts:
        ratio = _timing.ratio(timings.get((dataset, "xla")), timings.get((dataset, "graph")))
        for mode in MODES:
            key = (dataset, mode)
            if key in failures:
                lines.append(f"| {dataset} | {mode} | - | {failures[key]} | - | - |")
                continue
            lines.append(
                f"| {dataset} | {mode} | {compile_s[key]:.1f} | "
                f"{_timing.fmt_ms(timings.get(key))} | "
                f"{_timing.fmt_ms(timings.get(key, 'cpu'))} | "
                f"{_timing.fmt_ratio(ratio) if mode == 'xla' else ''} |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--repeats", default=10, show_default=True, type=click.IntRange(min=1),
              help="Interleaved rounds (one step of each variant per round).")
@click.option("--batch", "batch_size", default=None, type=click.IntRange(min=1),
              help="Batch size of both models.  [default: rnode train's]")
@_timing.common_options(HEADING, quick="Smoke run: batch 16, one round.",
                        no_write="Print the section only.")
def main(repeats, batch_size, quick, results, no_write, threads, seed):
    """Time one training step of rnode train's default 2-D and digits models and of a conv
    digits model, XLA against graph mode."""
    if quick:
        repeats, batch_size = 1, 16
    threads = _timing.set_threads(threads)
    variants, abouts = {}, {}
    for label, options in MODELS.items():
        more, abouts[label] = step_variants(label, options, batch_size, seed)
        variants.update(more)
    compiled, failures, compile_s = _timing.compile_all(variants)
    timings = _timing.time_interleaved(compiled, repeats, seed)
    args = {"repeats": repeats, "threads": threads}
    _timing.publish(report(timings, compile_s, failures, abouts, args), results, quick,
                    no_write)


if __name__ == "__main__":
    main()
