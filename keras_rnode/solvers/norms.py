"""Error norms of the adaptive solver: how a step's error estimate becomes one number.

Each entry's error is measured in units of its tolerance,
err_i / (atol + rtol * max(|y0_i|, |y1_i|)) (Hairer, Norsett & Wanner,
Solving ODEs I, Section II.4, eq. (4.10)-(4.11)), and a norm reduces those
over the controlled states:

    "rms"         the RMS over every controlled entry (the default; scipy's
                  and torchdiffeq's norm). One hard sample among many easy
                  ones is averaged away: its error grows with the batch
                  (patrick-kidger/diffrax#213).
    "per_sample"  each sample's RMS over its own controlled entries, the
                  leading axis of every controlled state being the sample
                  axis; a step is as good as its worst sample.

`norms` gives a vector (one entry for "rms", one per sample for
"per_sample"), `worst` its largest entry. Nothing to measure (an empty
state, an empty batch) has norm 0.
"""

import math

from keras_rnode import checks

ERROR_NORMS = ("rms", "per_sample")

# keras is imported when used, so that the command line's help loads without it.


def controlled(values, flags):
    """The values whose flag is true: the states under error control."""
    return [v for v, flag in zip(values, flags) if flag]


def scales(y0, y1, rtol, atol):
    """atol + rtol * max(|y0|, |y1|), entry by entry: the tolerance of each."""
    from keras import ops

    return [atol + rtol * ops.maximum(ops.abs(a), ops.abs(b)) for a, b in zip(y0, y1)]


def norms(values, scales_, kind):
    """The RMS of values / scales: (1,) over all entries ("rms") or (batch,) per sample."""
    from keras import ops

    squares = [ops.square(v / s) for v, s in zip(values, scales_)]
    dtype = squares[0].dtype
    if kind == "rms":
        total = sum(ops.sum(q) for q in squares)
        count = sum(ops.cast(ops.size(q), dtype) for q in squares)
        return ops.reshape(ops.sqrt(total / ops.maximum(count, 1.0)), (1,))
    totals = sum(_row_sums(q) for q in squares)
    count = sum(_row_size(q) for q in squares)
    return ops.sqrt(totals / count)


def worst(norms_):
    """The largest norm (0 for none; NaN if any is NaN, which rejects the step)."""
    from keras import ops

    # A zero appended: no reduction of an empty batch, which JAX and PyTorch refuse.
    largest = ops.max(ops.concatenate([norms_, ops.zeros((1,), norms_.dtype)]))
    return ops.where(ops.any(ops.isnan(norms_)), float("nan"), largest)


def check_sample_axis(states):
    """ValueError unless every state has a leading (sample) axis of one length.

    A length unknown while tracing (None) agrees with any.
    """
    shapes = [checks.static_shape(v) for v in states]
    for shape in shapes:
        if not shape:
            raise ValueError(f'error_norm="per_sample" needs a leading sample axis on every '
                             f'controlled state; got a scalar state among shapes {shapes}')
    if len({shape[0] for shape in shapes if shape[0] is not None}) > 1:
        raise ValueError(f'error_norm="per_sample" needs the controlled states to share '
                         f'their leading (sample) axis; got shapes {shapes}')


def _row_sums(x):
    from keras import ops

    # Not ops.sum(axis=()) for a 1-D state: PyTorch reads an empty axis list as "all".
    return x if len(x.shape) == 1 else ops.sum(x, axis=tuple(range(1, len(x.shape))))


def _row_size(x):
    """Entries per sample: known while tracing unless an event axis is not."""
    from keras import ops

    event = checks.static_shape(x)[1:]
    if None not in event:
        return float(math.prod(event))
    batch = ops.maximum(ops.cast(ops.shape(x)[0], x.dtype), 1.0)
    return ops.cast(ops.size(x), x.dtype) / batch
