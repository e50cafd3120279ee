#!/usr/bin/env bash
# The GPU benchmark of issue 16: keras-rnode on JAX (and the PyTorch backend) on one GPU,
# against diffrax and a PyTorch + torchdiffeq RNODE, in one command of under 8 minutes.
#
#   bash benchmarks/gpu.sh [--cpu] [--quick] [--allow-cpu] [--budget-s SECONDS]
#
# 1. Installs the wheels carried in .whl/ (keras and what it needs, keras-rnode;
#    made by benchmarks/gpu_wheels.sh) into /tmp/site when that folder exists: the
#    GPU machine has JAX, PyTorch, diffrax, torchdiffeq, scikit-learn and
#    matplotlib, but no Keras and no TensorFlow, and no network.
# 2. Checks that JAX sees the GPU and that XLA compiles the training step there
#    (its weights must live on the GPU); exits 1 if not, unless --cpu or --allow-cpu.
# 3. Writes one table, gpu.md and gpu.jsonl, to $OUT (benchmarks/results when OUT
#    is unset): the 2-D step (ours on JAX, diffrax, the PyTorch reference) at
#    batch 512 and a large batch; the MNIST recipe's step on JAX and on the
#    PyTorch backend with peak GPU memory and the projected MNIST run, and a
#    single-scale MNIST step by likelihood and by flow matching; with the time
#    left, RNODE against unregularized on the digits.
#
# --cpu: JAX on the CPU; --quick: tiny sizes (with --cpu a smoke test of about
# two minutes). --budget-s (default 420) bounds the benchmark itself.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi

python="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null \
        && ! "$python" -c "import sys; sys.exit(sys.version_info[:2] != (3, 12))"; then
    echo "gpu.sh: .whl/ holds wheels for Python 3.12; not installing them for $python" >&2
elif compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu.sh: installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/site" >&2
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$python" -c "import keras, jax" >/dev/null 2>&1; then
    echo "gpu.sh: keras and jax must be importable by $python (carry keras in .whl/:" \
         "bash benchmarks/gpu_wheels.sh)" >&2
    exit 3
fi
exec "$python" benchmarks/gpu_bench.py "$@"
