"""Held-out NLL of an RNODE on a 2-D toy distribution, against its true entropy.

    python benchmarks/toy_quality.py --dataset 8gaussians --steps 2000

Prints one JSON line per evaluation (every --every steps): held-out NLL in
nats on 5000 points drawn with a different seed, the evaluation NFE, and
the training metrics.
"""

import json
import os
import time

import click

os.environ.setdefault("KERAS_BACKEND", "tensorflow")


@click.command()
@click.option("--dataset", default="8gaussians", show_default=True)
@click.option("--steps", default=2000, show_default=True)
@click.option("--every", default=500, show_default=True)
@click.option("--batch-size", default=512, show_default=True)
@click.option("--regularization", default=0.01, show_default=True,
              help="lambda_K = lambda_J.")
def main(dataset, steps, every, batch_size, regularization):
    import keras
    import numpy as np

    import keras_rnode as kr

    keras.utils.set_random_seed(0)
    train = kr.datasets.make_dataset(kr.datasets.toy(dataset, 100_000, seed=0), batch_size,
                                     repeat=True)
    held_out = kr.datasets.toy(dataset, 5000, seed=1)
    cnf = kr.layers.CNF(kr.layers.ConcatSquashMLP((64, 64, 64)), trace="exact",
                        gradient="direct")
    model = kr.RNODE([cnf], kinetic=regularization, jacobian=regularization)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=True)
    start = time.time()
    for done in range(every, steps + 1, every):
        history = model.fit(train, epochs=1, steps_per_epoch=every, verbose=0).history
        log_p = np.concatenate([model.log_prob(held_out[i:i + 1000]).numpy()
                                for i in range(0, len(held_out), 1000)])
        row = dict(step=done, wall_s=round(time.time() - start, 1),
                   held_out_nll=float(-log_p.mean()),
                   true_entropy=kr.datasets.toy_entropy(dataset),
                   eval_nfe=int(cnf.stats["nfe"].numpy()),
                   **{k: round(float(v[-1]), 4) for k, v in history.items()})
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
