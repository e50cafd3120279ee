"""Tests run under KERAS_BACKEND (TensorFlow by default).

Under JAX or PyTorch only the tests marked `backends` (the solver, CNF
and model suites) are collected; the rest test TensorFlow-only paths
(tf.data, SavedModel export, TFP comparisons, the CLI and benchmarks).
"""

import os

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The float64 references need JAX's 64-bit mode (Keras keeps float32 the default).
os.environ.setdefault("JAX_ENABLE_X64", "1")


def pytest_collection_modifyitems(config, items):
    if os.environ["KERAS_BACKEND"] == "tensorflow":
        return
    keep = [item for item in items if item.get_closest_marker("backends")]
    dropped = [item for item in items if not item.get_closest_marker("backends")]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
