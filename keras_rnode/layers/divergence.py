"""Divergence (trace of df/dz) estimates for CNF dynamics, and the products they rest on.

`exact` and `hutchinson` return (f, trace, products) per sample, where
products are the estimator's Jacobian products, (k, batch, D): the D rows
of J, or the one product with the probe. The penalties read them
(`keras_rnode.regularizers.jacobian`: ||J||_F^2 / D). The product (J v or
v^T J) is the backend's choice: see `backend.jacobian_product`.
`directional` is the forward-mode product J v + dt * df/dt that other
penalties take.
"""

import functools
import math

# keras is imported when used, so that the command line's help loads without it.

TRACES = ("hutchinson", "exact")
PROBES = ("gaussian", "rademacher")
EXACT_TRACE_MAX_DIM = 10


def default_trace(event_shape):
    """The divergence estimator for data of `event_shape`: exact where it is cheap.

    The exact trace costs one Jacobian-vector product per dimension, so it
    is the choice for flat data of at most EXACT_TRACE_MAX_DIM dimensions
    (the 2-D toys); Hutchinson's estimator otherwise. The one rule for a
    CNF's evaluation trace and for `rnode train --trace auto`.
    """
    small = len(event_shape) == 1 and event_shape[0] <= EXACT_TRACE_MAX_DIM
    return "exact" if small else "hutchinson"


def _event_axes(z):
    return tuple(range(1, len(z.shape)))


def draw_probes(kind, shape, dtype, seed):
    """Hutchinson probes eps of `shape`: "gaussian" N(0, I) or "rademacher" +-1.

    `seed`: a keras.random.SeedGenerator (fresh probes at every draw: for
    training, each replica of a tf.distribute strategy drawing its own, see
    `distribute.replica_random`), or an int (the same probes for the same
    shape at every draw, in every process: for evaluation).
    """
    import keras
    from keras import ops

    from keras_rnode.backend import distribute

    draws = None
    if isinstance(seed, keras.random.SeedGenerator):
        draws = distribute.replica_random(seed)
    normal, randint = draws or (functools.partial(keras.random.normal, seed=seed),
                                functools.partial(keras.random.randint, seed=seed))
    if kind == "gaussian":
        return normal(shape, dtype=dtype)
    return ops.cast(2 * randint(shape, 0, 2) - 1, dtype)


def hutchinson(fn, z, eps, *per_sample):
    """One Jacobian-vector product w gives the trace and the Frobenius estimates.

    tr(J) ~ eps . w and ||J||_F^2 / D ~ mean(w^2), for eps with E[eps eps^T] = I
    (Hutchinson 1990; FFJORD, Grathwohl et al. 2019, eq. 7). Returns (f,
    trace, w as a (1, batch, D) product). fn(z, *per_sample): `per_sample`
    are tensors with a row per sample (a context), held fixed.
    """
    from keras import ops

    from keras_rnode import backend

    f, w = backend.jacobian_product(lambda z_: fn(z_, *per_sample), z, eps)
    products = ops.reshape(w, (1, ops.shape(w)[0], math.prod(z.shape[1:])))
    return f, ops.sum(eps * w, axis=_event_axes(z)), products


def exact(fn, z, *per_sample):
    """The Jacobian's diagonal from D products with basis vectors, batched as one call.

    The batch is repeated D times, copy i probing with e_i, so the network
    runs once on D * batch rows (fn(z, *per_sample), the per-sample tensors
    repeated alike). Returns (f, trace, the D rows of J as (D, batch, D)
    products), from which the Frobenius norm is exact too.
    """
    from keras import ops

    from keras_rnode import backend

    event_shape = tuple(z.shape[1:])
    dim = math.prod(event_shape)
    batch = ops.shape(z)[0]
    eye = ops.eye(dim, dtype=z.dtype)
    probes = ops.reshape(
        ops.repeat(eye[:, None, :], batch, axis=1), (dim * batch, *event_shape))
    z_rep, *rest = [ops.tile(v, (dim,) + (1,) * (len(v.shape) - 1)) for v in (z, *per_sample)]
    f_rep, rows = backend.jacobian_product(lambda z_: fn(z_, *rest), z_rep, probes)
    rows = ops.reshape(rows, (dim, batch, dim))
    trace = ops.sum(rows * eye[:, None, :], axis=(0, 2))
    return f_rep[:batch], trace, rows


def directional(fn, t, z, v, dt=0.0):
    """J v + dt * df/dt at (t, z): one forward-mode product of fn(t, z) in (t, z) along (dt, v).

    dt = 0 (a Python number) differentiates in z alone.
    """
    from keras import ops

    from keras_rnode import backend

    if isinstance(dt, (int, float)) and dt == 0:
        return backend.jvp(lambda z_: fn(t, z_), [z], [v])[1]
    t = ops.convert_to_tensor(t, z.dtype)
    return backend.jvp(fn, [t, z], [ops.cast(ops.full_like(t, dt), z.dtype), v])[1]
