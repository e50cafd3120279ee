"""Time per training step of the MNIST recipe (scripts/recipes.py mnist).

The model and optimizer are the recipe's: FFJORD's multiscale architecture
(3 scales, 10 CNF blocks), ConcatConv dynamics 64,64,64 3x3 softplus,
Hutchinson trace, RK4 at step 0.25, direct gradient, lambda_K = lambda_J =
0.01, Adam 1e-3 with 1000 warm-up steps, batch 200, graph mode
(jit_compile=False: on CPU XLA makes conv-dynamics steps about 14x slower).

    python benchmarks/mnist_step.py --steps 3                  # synthetic 28x28 data
    python benchmarks/mnist_step.py --data mnist --steps 3     # real MNIST (download)

--data synthetic (the default) draws uint8 images of MNIST's shape: the
cost of a fixed-step (RK4) training step does not depend on the pixel
values. The first step (tracing) is timed apart. Prints one JSON line.
"""

import json
import platform
import time

import click
import numpy as np


@click.command()
@click.option("--data", default="synthetic", type=click.Choice(["synthetic", "mnist"]))
@click.option("--steps", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--jit/--no-jit", default=False, show_default=True)
def main(data, steps, batch_size, jit):
    import keras

    import keras_rnode as kr
    from keras_rnode.backend.graph_options import avoid_addn_rewrite_race
    from keras_rnode.models.schedules import LinearWarmup

    if not jit:
        avoid_addn_rewrite_race()  # as `rnode train` does for images in graph mode
    if data == "mnist":
        (x, _), _ = kr.datasets.mnist()
        x = x[:batch_size * (steps + 1)]
    else:
        x = np.random.default_rng(0).integers(0, 256, (batch_size * (steps + 1), 28, 28, 1),
                                              dtype=np.uint8)
    keras.utils.set_random_seed(0)
    model = kr.multiscale_rnode(
        (28, 28, 1), channels=(64, 64, 64), blocks_per_scale=2, dynamics="concat",
        levels=256, logit_alpha=1e-6, kinetic=0.01, jacobian=0.01, seed=0,
        trace="hutchinson", method="rk4", step_size=0.25, gradient="direct")
    model.compile(optimizer=keras.optimizers.Adam(LinearWarmup(1e-3, 1000)), jit_compile=jit)
    dataset = kr.datasets.make_dataset(x, batch_size, repeat=True)
    iterator = iter(dataset)

    times = []
    for _ in range(steps + 1):
        batch = next(iterator)
        start = time.perf_counter()
        logs = model.train_on_batch(batch, return_dict=True)
        times.append(time.perf_counter() - start)
    print(json.dumps({
        "data": data, "batch_size": batch_size, "jit": jit, "blocks": len(model.blocks),
        "n_scales": model.n_scales, "params": model.count_params(),
        "first_step_s": round(times[0], 2), "step_s": [round(t, 2) for t in times[1:]],
        "median_step_s": round(float(np.median(times[1:])), 2),
        "bpd": round(float(logs["bpd"]), 4), "nfe": float(logs["nfe"]),
        "machine": f"{platform.processor() or platform.machine()}, shared 2-core CPU",
    }))


if __name__ == "__main__":
    main()
