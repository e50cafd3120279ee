"""One RNODE training step on TensorFlow, JAX and PyTorch, and on JAX against diffrax (issue 6).

The problem: `kr.layers.ConcatSquashMLP(hidden=(64, 64, 64))` with the same
fixed weights on every backend (normal, scale 0.3, none zeroed), a batch
of 512 points of `toy("8gaussians")`, float32, the exact trace (2-D),
dopri5 at rtol = atol = 1e-5, the RNODE loss (nll + 0.01 kinetic + 0.01
jacobian). One step is `model.train_on_batch` with SGD at learning rate 0
(so that every step is the same step), compiled with XLA on TensorFlow
and JAX and eager on PyTorch (Keras's torch.compile path is not ours).

diffrax: the same network, called through `stateless_call`, in a CNF
written with `diffrax.diffeqsolve(Dopri5(), PIDController(rtol, atol))`
whose norm covers z and log p only (as ours: the regularizer states do not
steer the steps), the same four states and loss, `jax.jit(value_and_grad)`;
its RecursiveCheckpointAdjoint is the counterpart of our direct gradient
and BacksolveAdjoint of our adjoint.

One worker process per backend (Keras picks its backend at import), each
single-threaded; the workers are timed in interleaved rounds, one step
each per round in shuffled order, so that load on a shared machine falls
on all alike. Reported: median wall time per step, NFE forward/backward,
time per forward NFE, and ratios to TensorFlow (and of ours to diffrax).
"""

import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import click  # noqa: E402
import numpy as np  # noqa: E402
from _timing import DEFAULT_RESULTS, common_options, publish  # noqa: E402
from diffrax_cnf import diffrax_step  # noqa: E402

HEADING = ("## Backends: one training step on TensorFlow, JAX and PyTorch; JAX against "
           "diffrax (issue 6), gradient={}")
ONE_THREAD = {
    "OMP_NUM_THREADS": "1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


# ------------------------------------------------------------------ worker --

def _build(gradient, batch, tol, weights_path):
    import keras

    import keras_rnode as kr
    from keras_rnode.datasets import toy

    x = toy("8gaussians", batch, seed=0)
    cnf = kr.layers.CNF(kr.layers.ConcatSquashMLP(hidden=(64, 64, 64)), trace="exact",
                        rtol=tol, atol=tol, gradient=gradient)
    model = kr.RNODE([cnf], kinetic=0.01, jacobian=0.01)
    model.build(x.shape)
    weights = np.load(weights_path)
    variables = cnf.dynamics.trainable_variables
    for i, v in enumerate(variables):
        v.assign(weights[f"w{i}"].reshape(v.shape))
    jit = keras.backend.backend() != "torch"
    model.compile(optimizer=keras.optimizers.SGD(0.0), jit_compile=jit)
    return model, cnf, x


def worker(backend, gradient, batch, tol, weights_path):
    variants = {}
    model, cnf, x = _build(gradient, batch, tol, weights_path)

    def ours():
        logs = model.train_on_batch(x, return_dict=True)
        return logs

    variants["ours"] = ours
    if backend == "jax" and find_spec("diffrax"):
        import diffrax

        adjoint = (diffrax.RecursiveCheckpointAdjoint() if gradient == "direct"
                   else diffrax.BacksolveAdjoint())
        variants["diffrax"] = diffrax_step(cnf.dynamics, x, tol, "exact", adjoint)
    info = {}
    for name, fn in variants.items():
        start = time.perf_counter()
        out = fn()
        info[name] = {"first_call_s": round(time.perf_counter() - start, 2)}
        if name == "ours":
            info[name].update(loss=float(out["loss"]), nfe=float(out["nfe"]),
                              backward_nfe=float(out.get("backward_nfe", float("nan"))))
        else:
            info[name].update(loss=out[0], nfe=6 * out[1] + 1)
        fn()  # a second warm-up call
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        times = {}
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - start
        print(json.dumps(times), flush=True)


# -------------------------------------------------------------------- main --

def _weights(path, seed=0):
    """Fixed weights in the dynamics' variable order, the same file for every backend."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras_rnode as kr

    net = kr.layers.ConcatSquashMLP(hidden=(64, 64, 64))
    net(np.zeros((), "float32"), np.zeros((1, 2), "float32"))
    rng = np.random.default_rng(seed)
    arrays = {f"w{i}": 0.3 * rng.normal(size=tuple(v.shape)).astype("float32")
              for i, v in enumerate(net.trainable_variables)}
    np.savez(path, **arrays)


def _start(backend, gradient, batch, tol, weights_path):
    env = dict(os.environ, KERAS_BACKEND=backend, **ONE_THREAD)
    cmd = [sys.executable, __file__, "--worker", backend, "--gradient", gradient,
           "--batch", str(batch), "--tol", str(tol), "--weights", str(weights_path)]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)


def _read(proc, backend):
    line = proc.stdout.readline()
    if not line:
        raise click.ClickException(f"the {backend} worker died (exit {proc.wait()})")
    return json.loads(line)


@click.command()
@click.option("--gradient", default="direct", type=click.Choice(["direct", "adjoint"]))
@click.option("--batch", default=512, show_default=True)
@click.option("--tol", default=1e-5, show_default=True)
@click.option("--repeats", default=15, show_default=True, help="Interleaved rounds.")
@click.option("--backends", default="tensorflow,jax,torch", show_default=True)
# No --threads or --seed: every worker runs one thread (ONE_THREAD) on fixed weights.
# A --quick run writes RESULTS.md too, as this script always did.
@common_options(HEADING.format("<gradient>"), quick="Smoke run: batch 64, 2 rounds.",
                no_write="Print only.", threads=None, quick_writes=True)
@click.option("--worker", default=None, hidden=True)
@click.option("--weights", default=None, hidden=True)
def main(gradient, batch, tol, repeats, backends, quick, results, no_write, worker, weights):
    """Time one training step per backend (and diffrax on JAX), interleaved."""
    if worker:
        return globals()["worker"](worker, gradient, batch, tol, weights)
    if quick:
        batch, repeats = 64, 2
    results = results or DEFAULT_RESULTS
    names = [b for b in backends.split(",")
             if b == "tensorflow" or find_spec({"jax": "jax", "torch": "torch"}[b])]
    out_dir = Path(results).parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = out_dir / "backends_weights.npz"
    _weights(weights_path)
    procs = {b: _start(b, gradient, batch, tol, weights_path) for b in names}
    info = {b: _read(p, b) for b, p in procs.items()}
    samples = {}
    rng = random.Random(0)
    for _ in range(repeats):
        order = list(procs)
        rng.shuffle(order)
        for b in order:
            procs[b].stdin.write("time\n")
            procs[b].stdin.flush()
            for name, seconds in _read(procs[b], b).items():
                samples.setdefault((b, name), []).append(seconds)
    for p in procs.values():
        p.stdin.write("quit\n")
        p.stdin.flush()
        p.wait()

    median = {k: statistics.median(v) for k, v in samples.items()}
    reference = median.get(("tensorflow", "ours"))
    rows = []
    for (b, name), seconds in median.items():
        facts = info[b][name]
        rows.append(dict(
            backend=b, variant="keras-rnode" if name == "ours" else "diffrax", ms=seconds * 1e3,
            loss=facts["loss"], nfe=facts["nfe"], backward_nfe=facts.get("backward_nfe"),
            us_per_nfe=seconds / facts["nfe"] * 1e6, first_call_s=facts["first_call_s"],
            vs_tensorflow=(seconds / reference) if reference else None))
    jax_ours, jax_diffrax = median.get(("jax", "ours")), median.get(("jax", "diffrax"))
    lines = [
        HEADING.format(gradient), "",
        f"`{' '.join(['python', 'benchmarks/backends.py', *sys.argv[1:]])}` on "
        f"{datetime.date.today()}, {os.cpu_count()} cores, one thread per worker; "
        f"gradient={gradient}, batch {batch}, dopri5 at {tol:g}, {repeats} interleaved rounds.",
        "",
        "| backend | variant | ms/step (median) | loss | NFE fwd | NFE bwd | us per fwd NFE "
        "| first call s | time / TF |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bwd = "-" if r["backward_nfe"] is None or r["backward_nfe"] != r["backward_nfe"] \
            else f"{r['backward_nfe']:.0f}"
        vs = "-" if r["vs_tensorflow"] is None else f"{r['vs_tensorflow']:.2f}"
        lines.append(f"| {r['backend']} | {r['variant']} | {r['ms']:.1f} | {r['loss']:.5f} "
                     f"| {r['nfe']:.0f} | {bwd} | {r['us_per_nfe']:.0f} "
                     f"| {r['first_call_s']:.1f} | {vs} |")
    if jax_ours and jax_diffrax:
        lines += ["", f"JAX: keras-rnode / diffrax time per step = "
                      f"{jax_ours / jax_diffrax:.2f} (goal: at most 1.2)."]
    text = "\n".join(lines) + "\n"
    publish(text, results, quick, no_write, HEADING.format(gradient))
    if not no_write:
        with open(out_dir / "backends.jsonl", "a") as f:
            f.write(json.dumps(dict(date=str(datetime.date.today()), gradient=gradient,
                                    batch=batch, tol=tol, repeats=repeats, rows=rows)) + "\n")


if __name__ == "__main__":
    main()
