"""`rnode train --dataset digits` with its defaults, against a Gaussian mixture on the same data.

    python benchmarks/digits_default.py --out runs/digits-default

Trains the default digits run (no options but --dataset and --out), timed
on the wall clock, and reads its held-out bits/dim and the per-epoch
training curve from the run directory. Beside it, scikit-learn's
full-covariance GaussianMixture is fitted to the same training split,
dequantized as the model's data is (y = (x + u) / 17, u ~ U[0, 1)), with
the number of components chosen on a held-out fifth of the training
split; its test bits/dim are -(log p(y) / D - log 17) / log 2, the model's
formula. The goal (issue 15): the default run beats the mixture within 20
minutes on this machine.
"""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402

HEADING = "## Digits: the default run against a Gaussian mixture (issue 15)"
COMPONENTS = (1, 2, 4, 8, 16)


def mixture_bits_per_dim(seed):
    """(test bits/dim, components) of the full-covariance mixture picked on validation."""
    from sklearn.mixture import GaussianMixture

    import keras_rnode as kr

    (x_train, _), (x_test, _) = kr.datasets.digits()
    levels, dims = kr.datasets.DIGITS_LEVELS, math.prod(x_train.shape[1:])
    rng = np.random.default_rng(seed)

    def dequantized(x):
        x = x.reshape(len(x), -1).astype(np.float64)
        return (x + rng.uniform(size=x.shape)) / levels

    def bits(mixture, y):
        return -(mixture.score(y) / dims - math.log(levels)) / math.log(2.0)

    y_train, y_test = dequantized(x_train), dequantized(x_test)
    cut = len(y_train) * 4 // 5

    def fit(y, k):
        return GaussianMixture(k, covariance_type="full", reg_covar=1e-6, max_iter=500,
                               random_state=seed).fit(y)

    validation = {k: bits(fit(y_train[:cut], k), y_train[cut:]) for k in COMPONENTS}
    best = min(validation, key=validation.get)
    return bits(fit(y_train, best), y_test), best, validation


@click.command()
@click.option("--out", default="runs/digits-default", show_default=True,
              help="Run directory of the default digits run (replaced).")
@_timing.common_options(HEADING, quick="Three steps, to check the script.",
                        no_write="Print the table only.", threads=None)
def main(out, quick, results, no_write):
    """Train the default digits run, fit the mixture, and compare their test bits/dim."""
    extra = ["--steps", "3"] if quick else []
    command = ["rnode", "train", "--dataset", "digits", "--out", out, "--overwrite", *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    run = Path(out)
    metrics = json.loads((run / "metrics.json").read_text())
    history = json.loads((run / "history.json").read_text())
    config = json.loads((run / "config.json").read_text())
    ours = metrics["test"]["bpd"]
    theirs, k, validation = mixture_bits_per_dim(seed=0)

    curve = history.get("bpd", [])
    stride = max(1, len(curve) // 12)
    lines = _timing.section_head(HEADING, _timing.command_line(), "keras", "scikit-learn")
    lines += [
        f"- Default run: `{' '.join(command)}`; it chose architecture "
        f"{config.get('architecture')}, widths {config.get('hidden')}, trace "
        f"{config.get('trace')}, {config.get('method')} training, batch "
        f"{config.get('batch_size')}, jit {config.get('jit')}; "
        f"{len(history.get('loss', []))} epochs.",
        f"- Mixture: scikit-learn GaussianMixture, full covariance, components picked on a "
        f"held-out fifth of the training split from {list(COMPONENTS)} (validation bits/dim "
        + ", ".join(f"{c}: {v:.3f}" for c, v in validation.items()) + f"): {k}.",
        "",
        "| model | test bits/dim (uniform dequantization) | wall time |",
        "|---|---:|---:|",
        f"| `rnode train --dataset digits` | **{ours:.3f}** | {wall / 60:.1f} min |",
        f"| Gaussian mixture ({k} components) | {theirs:.3f} | - |",
        "",
        f"Training curve (mean training bits/dim of every {stride}th epoch): "
        + ", ".join(f"{v:.3f}" for v in curve[::stride]) + ".",
    ]
    _timing.publish("\n".join(lines) + "\n", results, quick, no_write)


if __name__ == "__main__":
    main()
