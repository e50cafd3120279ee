#!/usr/bin/env bash
# GPU check and training-step timing for keras-rnode (issue 5).
#
#   bash benchmarks/gpu.sh [--quick] [--out PATH] [--budget-s SECONDS]
#
# 1. Checks that TensorFlow sees a GPU (tf.config.list_physical_devices)
#    and that a jit-compiled (XLA) CNF training step runs there: the step's
#    outputs must live on the GPU.
# 2. Times that training step (forward solve, loss with the RNODE
#    regularizers, adjoint gradient, Adam update) at a few batch sizes on
#    2-D data (ConcatSquashMLP 3 x 64) and on 8x8 one-channel images (the
#    digits' shape, ConcatSquashConvNet 3 x 64, levels 17, logit transform),
#    Hutchinson trace, dopri5 at rtol = atol = 1e-5.
# 3. Writes one markdown table to PATH (default: $OUT/gpu.md when OUT is
#    set, else benchmarks/results/gpu.md) and prints it.
#
# Without a GPU it falls back to the CPU and says so in the table (with
# --quick: tiny nets and batches, a smoke test; without: batch 512 only).
# The whole run stays under --budget-s (default 360 s): sizes not reached
# in time are listed as skipped. Needs TensorFlow with GPU support for the
# GPU path (pip install "tensorflow[and-cuda]"), and this package.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
dest=""
budget=360
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --out) dest="${2:?--out needs a path}"; shift ;;
        --budget-s) budget="${2:?--budget-s needs seconds}"; shift ;;
        -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$dest" ]; then
    if [ -n "${OUT:-}" ]; then dest="$OUT/gpu.md"; else dest="benchmarks/results/gpu.md"; fi
fi
mkdir -p "$(dirname "$dest")"

python="${PYTHON:-python3}"
if ! "$python" -c "import tensorflow, keras" >/dev/null 2>&1; then
    echo "gpu.sh: TensorFlow and Keras are not importable by $python; install the package" \
         "first (pip install . and, for a GPU, tensorflow[and-cuda])." >&2
    exit 3
fi
export KERAS_BACKEND=tensorflow TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$python" - "$quick" "$dest" "$budget" <<'PYTHON'
import datetime
import platform
import statistics
import sys
import time

import numpy as np
import tensorflow as tf
import keras

import keras_rnode as kr

quick, dest, budget = sys.argv[1] == "1", sys.argv[2], float(sys.argv[3])
started = time.perf_counter()
tf.get_logger().setLevel("ERROR")

gpus = tf.config.list_physical_devices("GPU")
device = "/GPU:0" if gpus else "/CPU:0"
if gpus:
    for gpu in gpus:  # take memory as needed, not all of it up front
        tf.config.experimental.set_memory_growth(gpu, True)
    name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    where = f"GPU: {len(gpus)} x {name}"
else:
    where = "no GPU found: CPU fallback"
    print("gpu.sh: tf.config.list_physical_devices('GPU') is empty; falling back to the CPU",
          file=sys.stderr)

if quick:
    sizes, hidden, channels, repeats = [16, 64], (16, 16), (8, 8), 2
elif gpus:
    sizes, hidden, channels, repeats = [512, 4096, 32768], (64, 64, 64), (64, 64, 64), 5
else:
    sizes, hidden, channels, repeats = [512], (64, 64, 64), (64, 64, 64), 3


def problem(kind, batch, seed=0):
    """(model, x): an RNODE with non-trivial fixed weights and a batch of data."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    if kind == "2-D":
        dynamics = kr.layers.ConcatSquashMLP(hidden=hidden, zero_init_last=False)
        model = kr.RNODE([kr.layers.CNF(dynamics, seed=seed)], kinetic=0.01, jacobian=0.01)
        x = kr.datasets.toy("8gaussians", batch, seed=seed)
    else:
        dynamics = kr.layers.ConcatSquashConvNet(channels=channels, zero_init_last=False)
        model = kr.RNODE([kr.layers.CNF(dynamics, seed=seed)], kinetic=0.01, jacobian=0.01,
                         levels=kr.datasets.DIGITS_LEVELS, logit_alpha=0.05, seed=seed)
        (images, _), _ = kr.datasets.digits()
        x = images[rng.integers(0, len(images), batch)].astype(np.float32)
    model.build((None, *x.shape[1:]))
    return model, tf.constant(x)


def training_step(model):
    """A jit-compiled step: loss (objective + regularizers), gradient, Adam update."""
    optimizer = keras.optimizers.Adam(1e-4)
    optimizer.build(model.trainable_variables)
    cnf = model.blocks[0]

    @tf.function(jit_compile=True)
    def step(x):
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            loss = (tf.reduce_mean(model.objective(out["log_prob"]))
                    + model.kinetic * tf.reduce_mean(out["kinetic"])
                    + model.jacobian * tf.reduce_mean(out["jacobian"]))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss, cnf.stats["nfe"].value, cnf.stats["backward_nfe"].value
    return step


rows, notes, placed = [], [], None
for kind in ("2-D", "8x8 images"):
    for batch in sizes:
        left = budget - (time.perf_counter() - started)
        if rows and left < 90:
            notes.append(f"{kind}, batch {batch}: skipped, {left:.0f} s of the budget left")
            continue
        try:
            with tf.device(device):
                model, x = problem(kind, batch)
                step = training_step(model)
                t0 = time.perf_counter()
                loss, nfe, bnfe = step(x)
                loss.numpy()
                compile_s = time.perf_counter() - t0
                step(x)[0].numpy()
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    loss, nfe, bnfe = step(x)
                    loss.numpy()
                    times.append(time.perf_counter() - t0)
        except Exception as err:  # noqa: BLE001 - reported in the table
            first = (str(err).strip().splitlines() or [""])[0][:160]
            notes.append(f"{kind}, batch {batch}: FAILED {type(err).__name__}: {first}")
            continue
        on = "GPU" if "GPU" in loss.device.upper() else "CPU"
        placed = on if placed in (None, on) else "mixed"
        ms = statistics.median(times) * 1e3
        evals = int(nfe) + int(bnfe)
        rows.append(f"| {kind} | {batch} | {on} | {int(nfe)} / {int(bnfe)} | {compile_s:.1f} "
                    f"| {ms:.1f} | {batch / ms * 1e3:,.0f} | {ms * 1e3 / max(evals, 1):.0f} "
                    f"| {float(loss):.3f} |")
        print(rows[-1], file=sys.stderr, flush=True)

ok = bool(gpus) and placed == "GPU"
verdict = ("PASS: the XLA training step compiled and ran on the GPU" if ok else
           "CPU FALLBACK: no GPU, the step ran on the CPU" if not gpus else
           f"FAIL: a GPU is present but the step's outputs were on: {placed}")
lines = [
    "## GPU training step (issue 5)",
    "",
    f"- Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
    f"- Machine: {where}; Python {platform.python_version()}, TensorFlow {tf.__version__}, "
    f"keras {keras.__version__}",
    f"- Command: `bash benchmarks/gpu.sh{' --quick' if quick else ''}`",
    f"- Check: GPUs listed: {len(gpus)}; {verdict}.",
    f"- Step: RNODE (kinetic = jacobian = 0.01) with one CNF block, Hutchinson trace, dopri5 "
    f"rtol = atol = 1e-5, adjoint gradient, Adam update, all in one "
    f"`tf.function(jit_compile=True)`; weights fixed (Glorot, last layer not zeroed). 2-D: "
    f"ConcatSquashMLP {hidden} on toy('8gaussians'); 8x8 images: ConcatSquashConvNet "
    f"{channels} on digits (17 levels, logit transform). Median of {repeats} steps after "
    f"two warm-up calls; compile = the first call.",
    "",
    "| data | batch | ran on | NFE fwd / bwd | compile [s] | step [ms] | samples / s "
    "| per evaluation [us] | loss |",
    "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    *rows,
    "",
    *[f"- {n}" for n in notes],
    f"Whole run {time.perf_counter() - started:.0f} s.",
    "",
]
text = "\n".join(lines)
with open(dest, "w") as f:
    f.write(text)
print(text)
print(f"written to {dest}", file=sys.stderr)
sys.exit(0 if (ok or not gpus) and rows else 1)
PYTHON
