"""Data transforms in front of a flow: uniform dequantization and the logit transform.

Convention for images with L grey levels (DESIGN.md, section 2)
----------------------------------------------------------------
Integers x in {0..L-1}^D are dequantized to y = (x + u) / L in [0, 1)^D.
The model's log p is the density of y on [0, 1)^D: log N(z) - delta_logp
+ the LogitTransform's log-det. Dequantize therefore returns a log-det of
ZERO: it defines the continuous variable rather than being a step of the
flow, and a model may sum the log-dets of all its transforms safely.

The rescaling from [0, L)^D to [0, 1)^D (log-det -D log L) enters once,
in the bits/dim formula, as in FFJORD and RNODE:

    bpd = -(log p(y) / D - log L) / log 2        (see `bits_per_dim`)

which is -log2 of the density of x + u on [0, L)^D, per dimension: an
upper bound on the discrete model's bits/dim when u ~ U[0, 1). Adding
-D log L to log p as well would count it twice.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_rnode import checks


def check_levels(x, levels):
    """Raise ValueError unless numpy x holds only integer values in [0, levels - 1]."""
    x = np.asarray(x)
    if x.dtype == bool or not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"x must be numeric, got dtype {x.dtype}")
    bad = ~np.isfinite(x) | (x < 0) | (x > levels - 1) | (x != np.round(x))
    count = int(bad.sum())
    if count:
        first = np.unravel_index(int(np.argmax(bad)), x.shape)
        raise ValueError(
            f"x must hold integers in [0, {levels - 1}] for levels={levels}; "
            f"{count} value(s) do not, the first at index {tuple(int(i) for i in first)}: "
            f"{x[first]!r}"
        )


def bits_per_dim(log_prob, dims, levels):
    """Bits/dim of integer data from log p of its dequantized image y in [0, 1)^D.

    log_prob: per-sample log density of y (nats, including the logit log-det);
    dims: D = pixels * channels; levels: L.
    """
    return -(log_prob / dims - math.log(levels)) / math.log(2.0)


def _sum_event(t):
    """Sum over every axis but the batch axis: a per-sample log-det of shape (batch,)."""
    axes = tuple(range(1, len(t.shape)))
    return ops.sum(t, axis=axes) if axes else t


@keras.saving.register_keras_serializable(package="keras_rnode")
class Dequantize(keras.layers.Layer):
    """Integers x in {0..levels-1} -> (y, logdet): y = (x + u) / levels in [0, 1).

    u ~ U[0, 1) is drawn from the layer's SeedGenerator, both in training
    and at evaluation (the reported figure is the uniform-dequantized one),
    or from the int `seed` a call passes: the same u for the same input
    at every call (an RNODE's evaluation does that, so that it is
    deterministic).
    u = 0.5 (the labelled "midpoint" figure) when called with
    deterministic=True, or at inference (training falsy) when the layer was
    built with midpoint=True; deterministic=False forces noise.

    logdet is zeros of shape (batch,): see the module docstring for why,
    and use `bits_per_dim` for the -log L per dimension.
    Numpy input is checked eagerly with `check_levels`.
    """

    def __init__(self, levels=256, midpoint=False, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.levels = checks.integer(levels, "levels", minimum=2)
        self.midpoint = bool(midpoint)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def __call__(self, x, *args, **kwargs):
        # Only concrete numpy data can be checked; tensors pass through.
        if isinstance(x, np.ndarray):
            check_levels(x, self.levels)
        return super().__call__(x, *args, **kwargs)

    def call(self, x, training=None, deterministic=None, seed=None):
        if deterministic is None:
            deterministic = self.midpoint and not training
        x = ops.cast(x, self.compute_dtype)
        if deterministic:
            u = 0.5
        else:
            u = keras.random.uniform(
                ops.shape(x), dtype=self.compute_dtype,
                seed=self.seed_generator if seed is None else seed
            )
        # x + u rounds up to `levels` when u is within half an ulp of 1; keep y < 1.
        below_one = 1.0 - float(np.finfo(np.dtype(self.compute_dtype)).epsneg)
        y = ops.minimum((x + u) / self.levels, below_one)
        logdet = ops.zeros_like(y[(slice(None),) + (0,) * (len(y.shape) - 1)])
        return y, logdet

    def compute_output_shape(self, input_shape):
        return tuple(input_shape), (input_shape[0],)

    def get_config(self):
        config = super().get_config()
        config.update(levels=self.levels, midpoint=self.midpoint, seed=self.seed)
        return config


@keras.saving.register_keras_serializable(package="keras_rnode")
class LogitTransform(keras.layers.Layer):
    """x in [0, 1] -> (y, logdet): y = logit(alpha + (1 - 2 alpha) x).

    alpha keeps y finite at 0 and 1; the default 1e-6 is FFJORD's (RealNVP
    used 0.05 for CIFAR-10). logdet, shape (batch,), is the sum over event
    dims of log|dy/dx| = log(1 - 2 alpha) - log s - log(1 - s), s = alpha +
    (1 - 2 alpha) x, and is added to log p. `inverse(y)` gives (x, -logdet).
    """

    def __init__(self, alpha=1e-6, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 < alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {alpha!r}")
        self.alpha = float(alpha)

    def __call__(self, x, *args, **kwargs):
        if isinstance(x, np.ndarray) and not np.all((x >= 0) & (x <= 1)):
            raise ValueError("LogitTransform expects x in [0, 1]")
        return super().__call__(x, *args, **kwargs)

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        s = self.alpha + (1.0 - 2.0 * self.alpha) * x
        log_s, log_1ms = ops.log(s), ops.log1p(-s)
        logdet = _sum_event(math.log1p(-2.0 * self.alpha) - log_s - log_1ms)
        return log_s - log_1ms, logdet

    def inverse(self, y):
        """y -> (x, logdet of the inverse map), the exact inverse of `call`."""
        y = ops.cast(y, self.compute_dtype)
        # log sigmoid via softplus stays finite for large |y|.
        log_s, log_1ms = -ops.softplus(-y), -ops.softplus(y)
        x = (ops.sigmoid(y) - self.alpha) / (1.0 - 2.0 * self.alpha)
        logdet = _sum_event(log_s + log_1ms - math.log1p(-2.0 * self.alpha))
        return x, logdet

    def compute_output_shape(self, input_shape):
        return tuple(input_shape), (input_shape[0],)

    def get_config(self):
        config = super().get_config()
        config.update(alpha=self.alpha)
        return config
