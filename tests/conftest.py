"""Tests run under KERAS_BACKEND (TensorFlow by default).

Under JAX or PyTorch only the tests marked `backends` (the solver, CNF
and model suites) are collected; the rest test TensorFlow-only paths
(tf.data, SavedModel export, TFP comparisons, the CLI and benchmarks).
"""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The float64 references need JAX's 64-bit mode (Keras keeps float32 the default).
os.environ.setdefault("JAX_ENABLE_X64", "1")
# JAX compiles every eager solve afresh (a new closure each call). A
# compilation cache keyed by the compiled program lets a repeated solve
# (the same model, shapes and solver) reuse the executable instead of
# recompiling it: the JAX suite runs in about two thirds of the time. A
# fresh directory per run, so no run reuses another's work.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _jax_cache = tempfile.mkdtemp(prefix="keras-rnode-jax-cache-")
    atexit.register(shutil.rmtree, _jax_cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _jax_cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_collection_modifyitems(config, items):
    if os.environ["KERAS_BACKEND"] == "tensorflow":
        return
    keep = [item for item in items if item.get_closest_marker("backends")]
    dropped = [item for item in items if not item.get_closest_marker("backends")]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
