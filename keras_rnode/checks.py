"""Argument checks shared by the whole package: one rule, one wording of its error.

Every check raises ValueError naming the argument, the value given and
what is allowed, and returns the value in its plain Python form. Bools
are never numbers here: `True` as a width or a tolerance is surely a
mistake, although Python counts it as the integer 1.
"""

import contextlib
import math
import numbers

import numpy as np


@contextlib.contextmanager
def owned_by(owner):
    """ValueErrors raised inside name their owner first: "block: rtol must be ..."."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"{owner}: {err}") from None


def is_real(value):
    """A real number (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def is_integer(value):
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def integer(value, name, minimum=1):
    """`value` as an int >= minimum."""
    if not is_integer(value) or value < minimum:
        what = " (a positive integer)" if minimum == 1 else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{what}, got {value!r}")
    return int(value)


def positive_finite(value, name):
    """`value` as a float > 0 that is finite."""
    if not (is_real(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def non_negative(value, name):
    """`value` as a finite float >= 0."""
    if not (is_real(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


def one_of(value, name, allowed):
    """`value`, which must be one of `allowed` (shown as given: a tuple or a sorted list)."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def positive_ints(values, name):
    """A sequence of positive ints, as a tuple (layer widths, channels; none is allowed)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a sequence of positive ints, got {values!r}")
    values = tuple(values)
    if not all(is_integer(v) and v > 0 for v in values):
        raise ValueError(f"{name} must be a sequence of positive ints, got {values!r}")
    return tuple(int(v) for v in values)


def static_shape(x):
    """x's shape as a tuple of ints, None for a dimension unknown while tracing."""
    return tuple(_static_dim(d) for d in x.shape)


def _static_dim(d):
    # None in TensorFlow; a symbolic dimension when JAX exports with a
    # polymorphic batch, whose int() raises something that is no TypeError.
    if d is None:
        return None
    try:
        return int(d)
    except Exception:
        return None


def shapes_agree(a, b):
    """Two static shapes of one rank whose known dimensions are equal."""
    return len(a) == len(b) and all(p is None or q is None or p == q for p, q in zip(a, b))


def check_finite(x, what="x"):
    """Raise ValueError when an array or eager tensor holds NaN or inf, naming the first bad row.

    NumPy arrays and tensors whose values are known (eager TensorFlow, JAX
    outside a trace, PyTorch) are checked; a traced tensor passes, as do
    non-float data: only concrete data can be checked before it is used.
    """
    if x is None or isinstance(x, (int, float, str, bytes, list, tuple, dict)):
        return
    if not isinstance(x, np.ndarray):
        import keras  # loaded already: x is a tensor, or a symbol of one

        if not keras.ops.is_tensor(x):
            return
        from keras_rnode import backend

        x = backend.static_value(x)
        if x is None:
            return
        x = np.asarray(x)
        if x.dtype.name == "bfloat16":  # ml_dtypes' type, not a NumPy floating
            x = x.astype(np.float32)
    if not np.issubdtype(x.dtype, np.floating) or x.ndim == 0:
        return
    bad = ~np.isfinite(x)
    count = int(bad.sum())
    if count:
        row = int(np.argmax(bad.reshape(len(x), -1).any(axis=1)))
        raise ValueError(f"{what} holds {count} non-finite value(s) (NaN or inf); the "
                         f"first in row {row}")
