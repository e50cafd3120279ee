"""A class-conditional RNODE against the unconditional one, on a labelled 2-D toy.

    python benchmarks/conditional.py --dataset 8gaussians --steps 1500

The labels are each point's mixture component (`toy(..., labels=True)`),
given one-hot as the context of the conditional model's dynamics
(ConcatSquashMLP(context_dim=C)). Both models have the same architecture
(3 x 64 softplus, exact trace, dopri5 at 1e-5, direct gradient,
lambda_K = lambda_J = 0.01, Adam 1e-3, batch 512, XLA) and start from the
same weights where they share them (the conditional one adds the context's
share of every gate and shift); they see the same batches. Every --every
steps both are scored on the same held-out points (drawn with seed + 1):
-log p(x | label) for the conditional model, -log p(x) for the other. The
first can go lower by up to the labels' information about x: for
well-separated components, by log C.
"""

import json
import math
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402

HEADING = "## Conditional flows: NLL given the label"


def build(context_dim, seed):
    import keras_rnode as kr

    net = kr.layers.ConcatSquashMLP(hidden=(64, 64, 64), context_dim=context_dim)
    cnf = kr.layers.CNF(net, trace="exact", gradient="direct", seed=seed)
    return kr.RNODE([cnf], kinetic=0.01, jacobian=0.01, seed=seed)


def share_weights(source, target):
    """Copy the unconditional model's weights into the conditional one's: each block's
    own come first, its context weights after them."""
    for ours, theirs in zip(source.blocks[0].dynamics.blocks, target.blocks[0].dynamics.blocks):
        for a, b in zip(ours.weights, theirs.weights):
            b.assign(a.value)


@click.command()
@click.option("--dataset", default="8gaussians", show_default=True)
@click.option("--steps", default=1500, show_default=True, type=click.IntRange(min=1))
@click.option("--every", default=250, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=512, show_default=True, type=click.IntRange(min=1))
@_timing.common_options(HEADING, quick="A few steps on little data, to check the script.",
                        no_write="Print the table only.")
def main(dataset, steps, every, batch_size, quick, results, no_write, threads, seed):
    """Train a conditional and an unconditional RNODE side by side; held-out NLL as they go."""
    import keras
    import numpy as np

    import keras_rnode as kr
    from keras_rnode.evaluation import log_prob_batches

    threads_label = _timing.set_threads(threads)
    if quick:
        steps, every, batch_size = 4, 2, 64
    classes = kr.datasets.TOY_CLASSES[dataset]
    n_train, n_test = (512, 256) if quick else (100_000, 5000)
    x, y = kr.datasets.toy(dataset, n_train, seed=seed, labels=True)
    x_test, y_test = kr.datasets.toy(dataset, n_test, seed=seed + 1, labels=True)
    one_hot = np.eye(classes, dtype="float32")
    c, c_test = one_hot[y], one_hot[y_test]

    keras.utils.set_random_seed(seed)
    models = {"unconditional": build(None, seed), "conditional": build(classes, seed)}
    models["unconditional"].build((None, 2))
    models["conditional"].build(((None, 2), (None, classes)))
    share_weights(models["unconditional"], models["conditional"])
    for model in models.values():
        model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=True)
    order = np.random.default_rng(seed).permutation(n_train)

    def batches(start, count):
        """The rows of batches start .. start + count - 1 of one seeded stream."""
        return order[(start * batch_size + np.arange(count * batch_size)) % n_train]

    rows, seconds = [], {name: 0.0 for name in models}
    for done in range(every, steps + 1, every):
        picked = batches(done - every, every)
        for name, model in models.items():
            inputs = (x[picked],) if name == "unconditional" else (x[picked], c[picked])
            start = time.process_time()
            model.fit(*inputs, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
            seconds[name] += time.process_time() - start
        row = {"step": done}
        for name, model in models.items():
            given = {"context": c_test} if name == "conditional" else {}
            log_p, nfe, _ = log_prob_batches(model, x_test, 1000, **given)
            row[name] = {"nll": float(-log_p.mean()), "eval_nfe": nfe,
                         "train_cpu_s": round(seconds[name], 1)}
        rows.append(row)
        click.echo(json.dumps(row), err=True)

    entropy = kr.datasets.toy_entropy(dataset)
    lines = _timing.section_head(HEADING, _timing.command_line(), "keras", "tensorflow")
    lines += [
        f"- Setup: {dataset} with its {classes} component labels (one-hot context); "
        f"ConcatSquashMLP 64 x 64 x 64 softplus, exact trace, dopri5 rtol = atol = 1e-05, "
        f"direct gradient, lambda_K = lambda_J = 0.01, Adam 1e-3, batch {batch_size}, XLA, "
        f"TensorFlow threads {threads_label}; shared weights equal at the start, the same "
        f"batches. Held out: {n_test} points of seed {seed + 1}.",
        "",
        "| step | unconditional -log p(x), nats | conditional -log p(x given label), nats "
        "| gap | eval NFE uncond. / cond. | training CPU s uncond. / cond. |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        u, k = row["unconditional"], row["conditional"]
        lines.append(f"| {row['step']} | {u['nll']:.3f} | {k['nll']:.3f} | "
                     f"{u['nll'] - k['nll']:.3f} | {u['eval_nfe']:.0f} / {k['eval_nfe']:.0f} | "
                     f"{u['train_cpu_s']:.0f} / {k['train_cpu_s']:.0f} |")
    if entropy is not None:
        lines += ["", f"The data's entropy is {entropy:.4f} nats; the labels can take at most "
                      f"log {classes} = {math.log(classes):.4f} off it."]
    _timing.publish("\n".join(lines) + "\n", results, quick, no_write)


if __name__ == "__main__":
    main()
