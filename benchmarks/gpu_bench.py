"""The GPU benchmark of issue 16, run by benchmarks/gpu.sh: JAX (and the PyTorch backend) on one GPU.

Two worker processes, one per Keras backend (Keras picks its backend at
import): the JAX worker checks that JAX sees the GPU and that XLA compiles
the training step there, times the MNIST-recipe step, the 2-D step (ours
and the same CNF in diffrax), a single-scale MNIST model's step by
likelihood and by flow matching (issue 25) and, with the time left, RNODE
against an unregularized CNF on the digits; the PyTorch worker times the
MNIST-recipe step on the PyTorch backend, the PyTorch + torchdiffeq
reference of benchmarks/reference_torch.py (issue 17) on the 2-D step, and
the single-scale model's steps. Each worker prints one JSON object per
result; this process collects them and writes one table, gpu.md (markdown)
and gpu.jsonl (the same rows), to --out.

    python benchmarks/gpu_bench.py --out DIR [--cpu] [--quick] [--budget-s S]

--cpu runs JAX on the CPU (JAX_PLATFORMS=cpu) and --quick shrinks every
size, so that the script is known to work before a GPU is at hand. The
run stops at --budget-s: parts not reached are listed as skipped.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The MNIST recipe's epochs (scripts/recipes.py; the paper gives its training
# time, not a step count): the projection is ms/step x 300 steps x this.
MNIST_EPOCHS = 100
MNIST_TRAIN = 60000


def sizes(quick, gpu):
    """Every size the run uses, by mode."""
    if quick:
        return dict(toy_batches=(64,), hidden=(16, 16, 16), repeats=2,
                    mnist_shape=(4, 4, 1), mnist_channels=(8,), mnist_batch=8, mnist_scales=1,
                    mnist_blocks=1, digits_channels=(8,), digits_batch=32, digits_eval=32,
                    digits_scales=1, digits_every=2, digits_s=5)
    return dict(toy_batches=(512, 32768 if gpu else 4096), hidden=(64, 64, 64),
                repeats=10 if gpu else 3, mnist_shape=(28, 28, 1),
                mnist_channels=(64, 64, 64), mnist_batch=200, mnist_scales=None,
                mnist_blocks=2, digits_channels=(32, 32, 32), digits_batch=200,
                digits_eval=360, digits_scales=None, digits_every=25, digits_s=None)


def emit(**row):
    print(json.dumps(row), flush=True)


def timed(fn, repeats):
    """(first call s, median ms of `repeats` calls after a second warm-up, last output)."""
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times) * 1e3, out


def left(deadline):
    return deadline - time.time()


# ---------------------------------------------------------------- JAX worker --

def jax_worker(quick, deadline):
    import jax
    import keras
    import numpy as np

    import keras_rnode as kr

    device = jax.devices()[0]
    gpu = device.platform == "gpu"
    size = sizes(quick, gpu)
    emit(kind="device", backend="jax", platform=device.platform,
         device=getattr(device, "device_kind", str(device)), count=jax.device_count(),
         jax=jax.__version__, keras=keras.__version__)

    def toy_model(batch, seed=0):
        keras.utils.set_random_seed(seed)
        # The last layer not zeroed: a non-trivial flow from the first step.
        net = kr.layers.ConcatSquashMLP(hidden=size["hidden"], zero_init_last=False)
        cnf = kr.layers.CNF(net, trace="hutchinson", method="dopri5", rtol=1e-5, atol=1e-5,
                            gradient="direct", seed=seed)
        model = kr.RNODE([cnf], kinetic=0.01, jacobian=0.01)
        model.build((None, 2))
        # Learning rate 0: every timed step is the same step (same weights, same NFE).
        model.compile(optimizer=keras.optimizers.SGD(0.0), jit_compile=True)
        x = kr.datasets.toy("8gaussians", batch, seed=seed)
        return model, cnf, x

    # 1. The check: XLA compiles our training step, and it runs where JAX puts it.
    checked = model, cnf, x = toy_model(size["toy_batches"][0])
    start = time.perf_counter()
    logs = model.train_on_batch(x, return_dict=True)
    compile_s = time.perf_counter() - start
    placed = {d.platform for v in model.trainable_variables for d in v.value.devices()}
    emit(kind="check", compiled_s=round(compile_s, 2), placed=sorted(placed),
         ok=bool(np.isfinite(logs["loss"])) and placed == {device.platform})

    # 2. The MNIST recipe's step: its peak memory is read before the toy runs.
    mnist_steps(size, "jax", quick, deadline, MNIST_VARIANTS[:1])

    # 3. The 2-D step: ours, then the same CNF in diffrax, at each batch.
    for batch in size["toy_batches"]:
        if left(deadline) < (10 if quick else 30):
            emit(kind="skipped", part=f"2-D step, batch {batch}", why="budget")
            continue
        model, cnf, x = checked if batch == size["toy_batches"][0] else toy_model(batch)
        first, ms, logs = timed(lambda: model.train_on_batch(x, return_dict=True),
                                size["repeats"])
        nfe = float(logs["nfe"])
        emit(kind="toy", impl="keras-rnode (JAX, XLA)", batch=batch, first_s=round(first, 2),
             ms=round(ms, 2), nfe=nfe, nfe_bwd=None, ms_per_eval=round(ms / nfe, 3),
             loss=round(float(logs["loss"]), 5), gradient="direct")
        try:
            from diffrax_cnf import diffrax_step

            first, ms, (loss, steps) = timed(diffrax_step(cnf.dynamics, x, trace="hutchinson"),
                                             size["repeats"])
            nfe = 6 * steps + 1
            emit(kind="toy", impl="diffrax (JAX, jit)", batch=batch, first_s=round(first, 2),
                 ms=round(ms, 2), nfe=nfe, nfe_bwd=None, ms_per_eval=round(ms / nfe, 3),
                 loss=round(loss, 5), gradient="RecursiveCheckpointAdjoint")
        except ImportError as err:
            emit(kind="skipped", part=f"diffrax, batch {batch}", why=one_line(err))
        except Exception as err:  # noqa: BLE001 - reported in the table
            emit(kind="failed", part=f"diffrax, batch {batch}", error=one_line(err))

    # 4. Flow matching against likelihood on a single-scale MNIST model.
    mnist_steps(size, "jax", quick, deadline, MNIST_VARIANTS[1:])

    # 5. With the time left: RNODE against unregularized on the digits.
    try:
        digits_race(size, deadline)
    except ImportError as err:
        emit(kind="skipped", part="digits", why=one_line(err))
    except Exception as err:  # noqa: BLE001 - reported in the table
        emit(kind="failed", part="digits", error=one_line(err))


# The MNIST step's variants: the recipe, and beside it a single-scale chain of as many
# full-resolution blocks as the recipe has per scale, trained by likelihood and by flow
# matching (a multiscale model squeezes between blocks: no one path for flow matching).
MNIST_VARIANTS = (("multiscale", "likelihood"), ("single-scale", "likelihood"),
                  ("single-scale", "flow_matching"), ("single-scale", "flow_matching_ot"))


def mnist_steps(size, backend, quick, deadline, variants):
    """Emit one row per (model, objective) of `variants`, as long as the budget lasts."""
    for model, objective in variants:
        part = f"mnist step, {model} {objective}, {backend}"
        if left(deadline) < (20 if quick else 60):
            emit(kind="skipped", part=part, why="budget")
            continue
        try:
            # JAX cannot reset its peak memory: only the recipe's row, its first, has its own.
            peak = backend == "torch" or (model, objective) == MNIST_VARIANTS[0]
            emit(**mnist_step(size, backend, model, objective, peak=peak))
        except Exception as err:  # noqa: BLE001 - reported in the table
            emit(kind="failed", part=part, error=one_line(err))


def mnist_step(size, backend, model_kind="multiscale", objective="likelihood", peak=True):
    """An MNIST training step on synthetic uint8 images: the recipe's (benchmarks/
    mnist_step.py's model) or a single-scale chain, by likelihood or by flow matching
    (`objective`: "flow_matching_ot" is the OT coupling); ms per step and peak memory."""
    import keras
    import numpy as np

    import keras_rnode as kr
    from keras_rnode import objectives
    from keras_rnode.models.schedules import LinearWarmup

    batch, shape = size["mnist_batch"], size["mnist_shape"]
    x = np.random.default_rng(0).integers(0, 256, (batch, *shape), dtype=np.uint8)
    keras.utils.set_random_seed(0)
    cnf_options = dict(trace="hutchinson", method="rk4", step_size=0.25, gradient="direct")
    if model_kind == "multiscale":
        model = kr.multiscale_rnode(
            shape, channels=size["mnist_channels"], blocks_per_scale=size["mnist_blocks"],
            n_scales=size["mnist_scales"], dynamics="concat",
            levels=256, logit_alpha=1e-6, kinetic=0.01, jacobian=0.01, seed=0, **cnf_options)
    else:
        fm = {"likelihood": "likelihood", "flow_matching": objectives.FlowMatching(),
              "flow_matching_ot": objectives.FlowMatching(coupling="ot")}[objective]
        blocks = [kr.layers.CNF(kr.layers.ConcatConvNet(channels=size["mnist_channels"]),
                                seed=i, **cnf_options) for i in range(size["mnist_blocks"])]
        model = kr.RNODE(blocks, levels=256, logit_alpha=1e-6, kinetic=0.01, jacobian=0.01,
                         seed=0, objective=fm)
        model.build((None, *shape))
    jit = backend == "jax"  # PyTorch's jit_compile is torch.compile: not ours
    model.compile(optimizer=keras.optimizers.Adam(LinearWarmup(1e-3, 1000)), jit_compile=jit)
    reset_peak_memory(backend)
    repeats = max(1, size["repeats"] // 2)
    first, ms, logs = timed(lambda: model.train_on_batch(x, return_dict=True), repeats)
    per_epoch = MNIST_TRAIN / size["mnist_batch"]
    recipe = model_kind == "multiscale"
    return dict(kind="mnist", backend=backend, jit=jit, model=model_kind, objective=objective,
                batch=batch, shape=list(shape), blocks=len(model.blocks),
                params=model.count_params(), first_s=round(first, 2), ms=round(ms, 1),
                nfe=float(logs.get("nfe", 0.0)), peak_mb=peak_memory_mb(backend) if peak else None,
                projected_h=round(ms * per_epoch * MNIST_EPOCHS / 3.6e6, 2) if recipe else None,
                full_size=shape == (28, 28, 1) and batch == 200)


def reset_peak_memory(backend):
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()


def peak_memory_mb(backend):
    """The device's peak allocated memory in MB (None on the CPU, which does not say).

    JAX cannot reset its peak: the MNIST step runs first in its worker."""
    if backend == "torch":
        import torch

        if not torch.cuda.is_available():
            return None
        return round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else round(peak / 2 ** 20, 1)


def digits_race(size, deadline):
    """RNODE (0.01, 0.01) against unregularized (0, 0) on the 8x8 digits: the same initial
    weights and the same batches, turn about; held-out bits/dim and evaluation NFE
    (dopri5 at 1e-5) against each model's own training time."""
    import keras
    import numpy as np

    import keras_rnode as kr

    (train, _), (test, _) = kr.datasets.digits()
    test = test[:size["digits_eval"]]
    budget = size["digits_s"] or left(deadline) - 45
    if left(deadline) < 30 or budget < 5:
        emit(kind="skipped", part="digits", why="budget")
        return
    models = {}
    for name, lam in (("RNODE", 0.01), ("unregularized", 0.0)):
        keras.utils.set_random_seed(0)
        model = kr.multiscale_rnode(
            (8, 8, 1), channels=size["digits_channels"], blocks_per_scale=1,
            n_scales=size["digits_scales"],
            dynamics="concat", levels=kr.datasets.DIGITS_LEVELS, logit_alpha=0.05,
            kinetic=lam, jacobian=lam, seed=0, trace="hutchinson", method="rk4",
            step_size=0.25, gradient="direct", eval_method="dopri5", eval_rtol=1e-5,
            eval_atol=1e-5)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=True)
        models[name] = model
    models["unregularized"].set_weights(models["RNODE"].get_weights())
    clock = {name: 0.0 for name in models}
    rng = np.random.default_rng(0)
    batch, every = size["digits_batch"], size["digits_every"]
    step = 0

    def evaluate(name):
        model = models[name]
        bpd = float(np.mean(keras.ops.convert_to_numpy(model.bits_per_dim(test))))
        nfe = sum(float(keras.ops.convert_to_numpy(b.stats["nfe"])) for b in model.blocks)
        emit(kind="digits", model=name, step=step, train_s=round(clock[name], 2),
             bpd=round(bpd, 4), eval_nfe=nfe)

    while True:
        for name in models:
            evaluate(name)
        if step == 0:
            start = time.time()  # after the first evaluation (and its compilation)
        elif time.time() - start > budget or left(deadline) < 20:
            break
        for _ in range(every):
            x = train[rng.integers(0, len(train), batch)]
            for name, model in models.items():
                t0 = time.perf_counter()
                model.train_on_batch(x)
                if step > 0:  # the first call compiles: not training time
                    clock[name] += time.perf_counter() - t0
            step += 1


# ------------------------------------------------------------ PyTorch worker --

def torch_worker(quick, deadline):
    import keras
    import torch

    cuda = torch.cuda.is_available()
    size = sizes(quick, cuda)
    emit(kind="device", backend="torch", platform="gpu" if cuda else "cpu",
         device=torch.cuda.get_device_name(0) if cuda else "cpu", torch=torch.__version__,
         keras=keras.__version__)
    mnist_steps(size, "torch", quick, deadline, MNIST_VARIANTS[:1])
    sys.path.insert(0, str(HERE))
    try:
        torch_reference(size, cuda, quick, deadline)
    except ImportError as err:
        emit(kind="skipped", part="PyTorch reference", why=one_line(err))
    mnist_steps(size, "torch", quick, deadline, MNIST_VARIANTS[1:])


def torch_reference(size, cuda, quick, deadline):
    """benchmarks/reference_torch.py's 2-D step at each batch."""
    import torch
    from reference_torch import Reference

    import keras_rnode as kr

    for batch in size["toy_batches"]:
        if left(deadline) < (5 if quick else 30):
            emit(kind="skipped", part=f"PyTorch reference, batch {batch}", why="budget")
            continue
        ref = Reference(dim=2, hidden=size["hidden"], seed=0)
        x = kr.datasets.toy("8gaussians", batch, seed=0)

        def step():
            out = ref.train_step(x)
            if cuda:
                torch.cuda.synchronize()
            return out

        first, ms, logs = timed(step, size["repeats"])
        emit(kind="toy", impl="PyTorch + torchdiffeq reference", batch=batch,
             first_s=round(first, 2), ms=round(ms, 2), nfe=logs["nfe"],
             nfe_bwd=logs["backward_nfe"], ms_per_eval=round(ms / logs["nfe"], 3),
             loss=round(logs["loss"], 5), gradient="odeint_adjoint")


# -------------------------------------------------------------------- main --

def one_line(err):
    return f"{type(err).__name__}: " + " ".join(str(err).split())[:200]


def run_worker(backend, args, deadline, rows, notes):
    env = dict(os.environ, KERAS_BACKEND=backend,
               # JAX would take 75% of the GPU up front; the PyTorch worker runs after it.
               XLA_PYTHON_CLIENT_PREALLOCATE="false", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("JAX_ENABLE_X64", None)  # float32 throughout, as the models train
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if args.cpu:
        env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, __file__, "--worker", backend, "--deadline", str(deadline)]
    cmd += ["--quick"] if args.quick else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        for line in proc.stdout:
            if line.startswith("{"):
                row = json.loads(line)
                rows.append(row)
                print(f"[{backend}] {line.strip()}", file=sys.stderr, flush=True)
        proc.wait(timeout=max(left(deadline) + 30, 1))
    except subprocess.TimeoutExpired:
        proc.kill()
        notes.append(f"the {backend} worker was stopped at the budget")
    if proc.returncode not in (0, None, -9):
        notes.append(f"the {backend} worker exited with {proc.returncode} (its stderr above)")
    return proc.returncode


def fmt(value, digits=1):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def table(rows, notes, args, started):
    devices = [r for r in rows if r["kind"] == "device"]
    check = next((r for r in rows if r["kind"] == "check"), None)
    jax_dev = next((r for r in devices if r["backend"] == "jax"), {})
    on_gpu = jax_dev.get("platform") == "gpu"
    if check is None:
        verdict = "FAIL: the JAX worker did not get to compile the step"
    elif check["ok"] and on_gpu:
        verdict = (f"PASS: JAX sees {jax_dev['count']} x {jax_dev['device']}; XLA compiled the "
                   f"training step there in {check['compiled_s']} s and its weights live there")
    elif check["ok"]:
        verdict = ("CPU: JAX runs on the CPU" + (" (--cpu)" if args.cpu else
                                                 ", no GPU found") +
                   f"; XLA compiled the training step in {check['compiled_s']} s")
    else:
        verdict = f"FAIL: the step's weights are on {check['placed']}"
    mode = " ".join(["--cpu"] * args.cpu + ["--quick"] * args.quick)
    lines = [
        "## JAX on the GPU: the training step against diffrax and torchdiffeq (issue 16)",
        "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"`bash benchmarks/gpu.sh {mode}`".rstrip() + f"; whole run "
        f"{time.time() - started:.0f} s.",
        f"- Machine: {platform.node()}, Python {platform.python_version()}; "
        + "; ".join(f"{d['backend']}: {d['device']} ({d['platform']}), keras {d['keras']}, "
                    + (f"jax {d['jax']}" if d["backend"] == "jax" else f"torch {d['torch']}")
                    for d in devices),
        f"- Check: {verdict}.",
        "",
        "### 1. The 2-D training step",
        "",
        "ConcatSquashMLP " + "x".join(map(str, sizes(args.quick, on_gpu)["hidden"]))
        + " softplus on toy('8gaussians'), Gaussian Hutchinson (one probe per sample and "
        "solve), dopri5 at rtol = atol = 1e-5, lambda_K = lambda_J = 0.01. Ours and diffrax: "
        "the same weights (Glorot, last layer not zeroed), every step the same step (ours: "
        "train_on_batch with SGD at rate 0; diffrax: loss and gradient, no update). The "
        "reference: PyTorch default initialization, Adam 1e-3 steps, so its NFE differ; "
        "compare ms per evaluation. NFE of diffrax = 6 x steps + 1. Median of the timed "
        "steps after two warm-up calls.",
        "",
        "| implementation | batch | gradient | ms / step | NFE fwd | NFE bwd | ms / fwd NFE "
        "| first call s | loss |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    toy = sorted((r for r in rows if r["kind"] == "toy"), key=lambda r: (r["batch"], r["impl"]))
    for r in toy:
        lines.append(f"| {r['impl']} | {r['batch']} | {r['gradient']} | {fmt(r['ms'])} "
                     f"| {fmt(r['nfe'], 0)} | {fmt(r['nfe_bwd'], 0)} | {fmt(r['ms_per_eval'], 3)} "
                     f"| {fmt(r['first_s'], 2)} | {fmt(r['loss'], 4)} |")
    lines += [
        "",
        "### 2. The MNIST recipe's training step, and flow matching beside it",
        "",
        "multiscale: the recipe, kr.multiscale_rnode (3 scales for 28x28, 2 CNF blocks per "
        "scale); single-scale: as many full-resolution blocks as the recipe has per scale "
        "(flow matching needs one path from data to noise, which a multiscale model's "
        "squeezes break). Both: concat conv dynamics, Hutchinson, rk4 at step 0.25, direct "
        "gradient, lambda_K = lambda_J = 0.01, Adam with warm-up; synthetic uint8 images (a "
        "fixed-step step costs the same on any pixels). Flow matching (OT: the minibatch "
        "assignment on the host) solves nothing: NFE 0. Projected (the recipe only): ms / "
        f"step x {MNIST_TRAIN // 200} steps x {MNIST_EPOCHS} epochs (the recipe's count) at "
        "batch 200. JAX cannot reset its peak memory: only its first row has one.",
        "",
        "| backend | compiled | model | objective | images | batch | blocks | ms / step | NFE "
        "| peak memory MB | first call s | projected MNIST run h |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in (r for r in rows if r["kind"] == "mnist"):
        projected = ("-" if r.get("projected_h") is None else
                     fmt(r["projected_h"], 2) if r["full_size"] else "- (not full size)")
        lines.append(f"| {r['backend']} | {'XLA' if r['jit'] else 'eager'} "
                     f"| {r.get('model', 'multiscale')} | {r.get('objective', 'likelihood')} "
                     f"| {'x'.join(map(str, r['shape']))} | {r['batch']} | {r['blocks']} "
                     f"| {fmt(r['ms'])} | {fmt(r['nfe'], 0)} | {fmt(r['peak_mb'])} "
                     f"| {fmt(r['first_s'], 2)} | {projected} |")
    digits = [r for r in rows if r["kind"] == "digits"]
    lines += [
        "",
        "### 3. RNODE against unregularized on the digits",
        "",
        "scikit-learn's 8x8 digits (17 levels, logit 0.05), kr.multiscale_rnode with one "
        "block per scale, Hutchinson, rk4 at 0.25, Adam 1e-3; both start from the same "
        "weights and take the same batches, turn about. Held-out bits/dim (uniform "
        "dequantization, fixed-seed probes) and the evaluation's NFE (dopri5 at 1e-5, all "
        "blocks) against each model's own training time (its first, compiling step not "
        "counted).",
        "",
        "| model | step | train s | bits/dim | eval NFE |",
        "|---|---:|---:|---:|---:|",
        *[f"| {r['model']} | {r['step']} | {fmt(r['train_s'], 2)} | {fmt(r['bpd'], 4)} "
          f"| {fmt(r['eval_nfe'], 0)} |" for r in digits],
        "",
        *[f"- {r['part']}: skipped ({r['why']})" for r in rows if r["kind"] == "skipped"],
        *[f"- {r['part']}: FAILED {r['error']}" for r in rows if r["kind"] == "failed"],
        *[f"- {n}" for n in notes],
        "",
    ]
    ok = check is not None and check["ok"] and (on_gpu or args.cpu or args.allow_cpu)
    return "\n".join(lines), ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for gpu.md and gpu.jsonl "
                        "(default: $OUT, else benchmarks/results)")
    parser.add_argument("--cpu", action="store_true", help="JAX on the CPU")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="exit 0 when no GPU is found (the table says so)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for the benchmark (default 420, --quick 150)")
    parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        (jax_worker if args.worker == "jax" else torch_worker)(args.quick, args.deadline)
        return 0

    started = time.time()
    deadline = started + (args.budget_s or (150.0 if args.quick else 420.0))
    out = Path(args.out or os.environ.get("OUT") or HERE / "results")
    out.mkdir(parents=True, exist_ok=True)
    rows, notes = [], []
    run_worker("jax", args, deadline, rows, notes)
    if left(deadline) > 20:
        run_worker("torch", args, deadline, rows, notes)
    else:
        notes.append("the PyTorch worker: skipped, budget spent")
    text, ok = table(rows, notes, args, started)
    (out / "gpu.md").write_text(text)
    with open(out / "gpu.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(text)
    print(f"written to {out / 'gpu.md'} and {out / 'gpu.jsonl'}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
