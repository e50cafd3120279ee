"""Divergence (trace of df/dz) and Frobenius estimates for CNF dynamics.

Both return (f, trace, frobenius) per sample, where frobenius is the mean
over event dimensions of (J eps)^2, the RNODE Jacobian regularizer; its
expectation is ||J||_F^2 / D.
"""

import math

from keras import ops


def _event_axes(z):
    return tuple(range(1, len(z.shape)))


def hutchinson(fn, z, eps):
    """One forward-mode product v = J eps gives both estimates.

    tr(J) ~ eps . v and ||J||_F^2 / D ~ mean(v^2), for eps with E[eps eps^T] = I.
    """
    f, v = ops.jvp(fn, (z,), (eps,))
    axes = _event_axes(z)
    return f, ops.sum(eps * v, axis=axes), ops.mean(ops.square(v), axis=axes)


def exact(fn, z):
    """The Jacobian's diagonal from D forward-mode products, batched as one call.

    The batch is repeated D times, copy i pushing the basis vector e_i, so
    the network runs once on D * batch rows. Frobenius is exact too:
    ||J||_F^2 / D, the expectation of the Hutchinson figure.
    """
    event_shape = tuple(z.shape[1:])
    dim = math.prod(event_shape)
    batch = ops.shape(z)[0]
    eye = ops.eye(dim, dtype=z.dtype)
    tangents = ops.reshape(
        ops.repeat(eye[:, None, :], batch, axis=1), (dim * batch, *event_shape))
    z_rep = ops.tile(z, (dim,) + (1,) * len(event_shape))
    f_rep, cols = ops.jvp(fn, (z_rep,), (tangents,))
    cols = ops.reshape(cols, (dim, batch, dim))
    trace = ops.sum(cols * eye[:, None, :], axis=(0, 2))
    frobenius = ops.sum(ops.square(cols), axis=(0, 2)) / dim
    return f_rep[:batch], trace, frobenius
