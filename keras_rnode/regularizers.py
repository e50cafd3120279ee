"""Penalties on a flow's dynamics, by name: RNODE's regularizers and any of your own.

A penalty is a function `fn(inputs) -> (batch,)` of what the dynamics give
at one evaluation (`PenaltyInputs`: the time t, the state z, f = dz/dt, the
context, a Jacobian-vector product and the trace estimator's products).
A CNF integrates each penalty it is asked for over its time interval as one
more state of its solve, left out of step-size control, so a penalty's value
is the per-sample integral int_0^T fn(inputs(t)) dt, summed over the blocks
of a model. The training loss adds weight x the batch mean of each
(DESIGN.md, section 2).

Built-ins, with the reference implementation's per-dimension normalization
(ffjord-rnode, lib/layers/wrappers/cnf_regularization.py; Finlay et al.,
"How to train your neural ODE", ICML 2020, eq. 8 and 10), D the event size:

    kinetic            0.5 * mean over event dims of f^2
    jacobian           ||J||_F^2 / D: exact with the exact trace, and with
                       Hutchinson's the mean of (eps^T J)^2 (its estimate)
    directional        0.5 * mean over event dims of (J f)^2
    total_derivative   0.5 * mean over event dims of (df/dt + J f)^2

J f is the derivative of f along the flow at fixed t, df/dt + J f the total
derivative of f(t, z(t)) in t (a forward-mode product in (t, z) along
(1, f)). The reference code computes its "directional derivative" as the
vector-Jacobian product f^T J, which equals J f only for a symmetric J;
here both are the forward products their names describe.

    import keras_rnode as kr

    @kr.regularizers.register("speed")          # returns fn: a decorator
    def speed(inputs):                           # (batch,): |f| per sample
        return keras.ops.sqrt(keras.ops.sum(keras.ops.square(inputs.f), axis=-1))

(`event_mean` here averages over the event axes in the input's dtype,
which `keras.ops.mean` does not for float64 off TensorFlow.)

    model = kr.RNODE([cnf], regularizers={"kinetic": 0.01, "speed": 0.1})

A model stores its penalties by name: a model saved with a penalty of your
own loads only where that name is registered again (the error says which).

This module loads without keras (the command line lists the names); the
penalties import it when they run.
"""

import math
import re
from typing import Callable, NamedTuple


class PenaltyInputs(NamedTuple):
    """What a penalty sees at one evaluation of the dynamics.

    t: the scalar time. z: the state (batch, *event_shape). f: dz/dt, z's
    shape. context: the per-sample context (batch, C), or None.
    trace_products: the trace estimator's Jacobian products, (k, batch, D)
    with D the event size: eps^T J for Hutchinson's estimator (k = 1), the
    D rows of J for the exact trace; sum over k of the mean over D of their
    squares is the `jacobian` penalty. jvp(v, dt=0.0): J v + dt * df/dt,
    z's shape: one forward-mode product through the dynamics.
    """

    t: object
    z: object
    f: object
    context: object
    trace_products: object
    jvp: Callable


def event_mean(x):
    """Mean over the event (non-batch) axes, computed in x's dtype.

    Not ops.mean: Keras 3.15 averages float64 in float32 off TensorFlow
    (its type promotion maps 64-bit floats to 32 bits), which costs a
    float64 model 8 digits in the penalty states.
    """
    from keras import ops

    return ops.sum(x, axis=tuple(range(1, len(x.shape)))) / math.prod(x.shape[1:])


def kinetic(inputs):
    """0.5 * mean over event dims of f^2: the kinetic energy (RNODE eq. 8)."""
    from keras import ops

    return 0.5 * event_mean(ops.square(inputs.f))


def jacobian(inputs):
    """||J||_F^2 / D: exact from the exact trace's rows, else mean (eps^T J)^2 (RNODE eq. 10)."""
    from keras import ops

    products = inputs.trace_products
    return ops.sum(ops.square(products), axis=(0, 2)) / products.shape[-1]


def directional(inputs):
    """0.5 * mean over event dims of (J f)^2: the change of f along the flow at fixed t."""
    from keras import ops

    return 0.5 * event_mean(ops.square(inputs.jvp(inputs.f)))


def total_derivative(inputs):
    """0.5 * mean over event dims of (df/dt + J f)^2: the acceleration of a particle."""
    from keras import ops

    return 0.5 * event_mean(ops.square(inputs.jvp(inputs.f, dt=1.0)))


BUILTINS = ("kinetic", "jacobian", "directional", "total_derivative")
_REGISTRY = {name: globals()[name] for name in BUILTINS}
# Names a penalty may not take: fit logs each penalty under its name beside these.
_RESERVED = ("loss", "nll", "bpd", "nfe", "backward_nfe", "solver_failures", "log_prob",
             "skipped_steps", "flow_matching")


def register(name, fn=None):
    """Register `fn` as the penalty `name`; returns fn (so `@register(name)` decorates).

    `fn(inputs)` takes a `PenaltyInputs` (t, z, f, context, trace_products,
    jvp) at one evaluation of the dynamics and returns a (batch,) tensor in
    z's dtype, the penalty's rate per sample; the model integrates it over
    each block's [0, T] and sums the blocks. `name` must be an identifier
    that is not a built-in's or a logged metric's; registering a name of
    your own again replaces its function.
    Raises ValueError for a bad or taken name, TypeError if fn is not callable.
    """
    if fn is None:
        return lambda f: register(name, f)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"a penalty's name must be an identifier (it names a logged "
                         f"metric), got {name!r}")
    if name in BUILTINS:
        raise ValueError(f"{name!r} is a built-in penalty; register yours under another name")
    if name in _RESERVED:
        raise ValueError(f"{name!r} names a metric that fit logs; choose another name")
    if not callable(fn):
        raise TypeError(f"a penalty must be callable as fn(inputs) -> (batch,), got "
                        f"{type(fn).__name__}")
    _REGISTRY[name] = fn
    return fn


def names():
    """The registered penalties' names: the built-ins first, then yours in order."""
    return tuple(_REGISTRY)


def get(name):
    """The penalty function registered as `name`; ValueError naming the known ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown penalty {name!r}; the registered ones are {list(_REGISTRY)}. A penalty "
            f"of your own must be registered (keras_rnode.regularizers.register({name!r}, fn)) "
            "before a model that uses it is built or loaded") from None


def weights(regularizers):
    """{name: weight} checked: registered names, weights finite and >= 0, as floats."""
    from keras_rnode import checks

    if not isinstance(regularizers, dict):
        raise ValueError(f"regularizers must be a dict of penalty name -> weight, got "
                         f"{type(regularizers).__name__}")
    for name in regularizers:
        get(name)
    return {name: checks.non_negative(w, name) for name, w in regularizers.items()}
