#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels benchmarks/gpu.sh installs on the GPU machine.
#
#   bash benchmarks/gpu_wheels.sh
#
# That machine (Python 3.12, x86_64 Linux, no network) has JAX, PyTorch, diffrax,
# torchdiffeq, scikit-learn, matplotlib and click, but no Keras. Carried: keras
# 3.15.1 and what it needs that JAX and PyTorch do not bring (absl-py, namex,
# optree, h5py, rich and rich's own markdown-it-py, mdurl, pygments, packaging),
# at the versions this project tests with, as cp312 manylinux wheels; and
# keras-rnode itself. numpy and ml_dtypes are not carried: JAX requires both, so
# they are there, and a second numpy on the path would shadow the one JAX was
# installed with.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
mkdir -p .whl
rm -f .whl/*.whl
for spec in keras==3.15.1 absl-py==2.5.1 namex==0.1.0 optree==0.20.0 h5py==3.14.0 \
            rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0 packaging==26.4; do
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl "$spec"
done
"$python" -m pip wheel -q --no-deps . -w .whl
ls -1 .whl
