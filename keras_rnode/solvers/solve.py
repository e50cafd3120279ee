"""`odeint`: the public entry point of the solver."""

import numbers
import warnings

import keras
import numpy as np
from keras import ops
from keras import tree

from keras_rnode import backend, checks
from keras_rnode.solvers import norms
from keras_rnode.solvers.adjoint import adjoint_backward
from keras_rnode.solvers.direct import direct_backward
from keras_rnode.solvers.integrate import epsilon, integrate
from keras_rnode.solvers.solution import Solution, Status
from keras_rnode.solvers.settings import resolve

STAT_NAMES = ("nfe", "accepted", "rejected", "status")
# rtol and atol below this many machine epsilons of the state's dtype cannot
# be met: the error estimate is rounding noise there. (8, not 10: float32's
# 1e-6, which users and the docs take, stays allowed.)
RESOLVABLE_EPS = 8


def odeint(func, y0, t0=0.0, t1=1.0, *, args=None, solver=None, error_control=None,
           on_backward=None, **options):
    """Integrate dy/dt = func(t, y) (or func(t, y, args)) from t0 to t1 (t1 < t0 runs backwards).

    Args:
        func: callable (t, y) -> dy/dt with the structure and shapes of y;
            with `args`, (t, y, args) -> dy/dt.
        y0: a floating tensor or a tuple/list of them (any shapes, one dtype).
        t0, t1: the ends: finite numbers, or scalar tensors (or variables),
            which then get gradients: dL/dt1 = <dL/dy(t1), f(t1, y(t1))>,
            dL/dt0 = -<dL/dy(t0), f(t0, y0)>, with either gradient method.
        args: a tensor or a structure of tensors handed to func whole and
            differentiated like the weights func reads (a conditional
            flow's context, an encoder's output). Pass here every tensor
            that func reads from outside and that needs a gradient.
        solver: a `SolverSettings`; or give its fields as keywords:
            method ("dopri5" adaptive, "rk4" or "euler" fixed-step),
            rtol, atol, error_norm ("rms", or "per_sample": the step as
            good as its worst sample, the leading axis of every controlled
            state being the sample axis), step_size (fixed-step methods),
            max_steps, gradient ("adjoint", "direct" or "none"),
            first_step, controller (a StepController, PIController or any
            object with the controller interface: solvers/controller.py).
            Keywords given with `solver` replace its fields.
        error_control: booleans in the structure of y0; False leaves that
            state out of step-size control (default: all controlled).
        on_backward: called with the backward solve's stats dict (adjoint
            only) when gradients are computed; not on JAX, whose custom
            gradients cannot have side effects. A backward solve that fails
            (max_steps, step underflow, a non-finite state) gives NaN gradients.

    Returns:
        A `Solution` with `y` (structure of y0) and `stats`. An empty batch
        (every state with no entry) is a success with no evaluation.

    Raises:
        ValueError for a bad y0, func, end time or setting (naming it), for
        an adaptive solve's rtol or atol below what y0's dtype resolves
        (8 machine epsilons: float16 7.8e-3, bfloat16 6.25e-2, float32
        9.5e-7), and for error_norm="per_sample" on controlled states
        without a common leading axis; TypeError for a keyword that is not
        a solver setting.

    Tracing: func is traced wherever the solve is, and a Python side effect
    in it (a print, a list it appends to) then runs when it is traced, not
    at each evaluation. On TensorFlow that is inside tf.function and Keras's
    fit (graph mode or XLA), and also eagerly while a gradient tape records
    (odeint traces func once more to find the tensors it captures); on JAX
    always (its loops trace func). Eager TensorFlow without a tape and
    PyTorch call func at each evaluation.

    Dtypes: the solve runs in y0's dtype. JAX keeps float64 only with
    JAX_ENABLE_X64 set (before jax is imported); without it a float64 y0
    silently becomes float32, and odeint warns (UserWarning) where it sees
    that happen.
    """
    settings = resolve(solver, options)
    flat_y0, controlled = _validate(func, y0, t0, t1, error_control)
    dtype = flat_y0[0].dtype
    if settings.adaptive:
        _check_resolution(settings, dtype)
        if settings.error_norm == "per_sample":
            norms.check_sample_axis(norms.controlled(flat_y0, controlled))
    # What the solve reads besides y0 that can carry a gradient: the end
    # times (unless both are plain numbers, which keeps a fixed-step count
    # known while tracing) and args.
    timed = not (_is_number(t0) and _is_number(t1))
    ends = [_tensor(t, dtype) for t in (t0, t1)] if timed else []
    inputs = ends + ([] if args is None else [_tensor(v) for v in tree.flatten(args)])

    def unpack(flat_inputs):
        """(t0, t1, args) from the flat inputs."""
        start, end = flat_inputs[:2] if timed else (t0, t1)
        rest = None if args is None else tree.pack_sequence_as(args, flat_inputs[len(ends):])
        return start, end, rest

    def flat_func(t, y, flat_inputs):
        state = tree.pack_sequence_as(y0, y)
        out = func(t, state) if args is None else func(t, state, unpack(flat_inputs)[2])
        _check_output(y0, y, out)
        return tree.flatten(out)

    def forward(f, y0_, inputs_):
        start, end, _ = unpack(inputs_)
        return integrate(lambda t, y: f(t, y, inputs_), settings, y0_, start, end,
                         controlled=controlled, record=settings.gradient == "direct")

    def backward(f, params, y0_, inputs_, records, y1, grads_y1):
        start, end, _ = unpack(inputs_)
        # The inputs are constants of the dynamics as the weights are: the
        # gradient methods differentiate one list of both.
        k = len(inputs_)

        def f_c(t, y, constants):
            return f(t, y, constants[:k], constants[k:])

        constants = [*inputs_, *params]
        if settings.gradient == "direct":
            grads_y0, grads_c = direct_backward(f_c, constants, settings.tableau, start, end,
                                                records, grads_y1)
            ok = True
        else:
            grads_y0, grads_c, stats = adjoint_backward(f_c, constants, settings, y1, start,
                                                        end, grads_y1, controlled)
            if on_backward is not None and backend.REPORTS_BACKWARD:
                on_backward(dict(zip(STAT_NAMES, stats)))
            ok = stats[3] == Status.SUCCESS
        grads_inputs, grads_params = list(grads_c[:k]), list(grads_c[k:])
        if timed:
            grads_inputs[:2] = _end_time_gradients(lambda t, y: f(t, y, inputs_, params),
                                                   start, end, y0_, y1, grads_y0, grads_y1)
        grads = (list(grads_y0), grads_inputs, grads_params)
        if ok is True:
            return grads
        # A backward solve that stopped short of t0 has no gradient to give:
        # NaN shows it (and lets a NaN-skipping optimizer skip the step)
        # where the adjoint reached would pass for one.
        return tuple([ops.where(ok, g, ops.full_like(g, float("nan"))) for g in group]
                     for group in grads)

    y1, stats = backend.differentiable_solve(
        flat_func, flat_y0, inputs, forward,
        None if settings.gradient == "none" else backward)
    return Solution(y=tree.pack_sequence_as(y0, y1), stats=dict(zip(STAT_NAMES, stats)))


def _end_time_gradients(f, t0, t1, y0, y1, grads_y0, grads_y1):
    """[dL/dt0, dL/dt1]: y(t1) moves with t1 at f(t1, y(t1)); moving t0
    shifts the start, whose cotangent is dL/dy0, by -f(t0, y0)."""
    def inner(a, b):
        return sum(ops.sum(u * v) for u, v in zip(a, b))

    return [-inner(grads_y0, f(t0, y0)), inner(grads_y1, f(t1, y1))]


def _is_number(t):
    return isinstance(t, numbers.Real) and not isinstance(t, bool)


def _tensor(v, dtype=None):
    """v as a tensor: a Keras variable's value (read here, outside the solve, so
    that the solve sees an input and not a weight); NumPy arrays keep their
    dtype (Keras's PyTorch backend would make float64 into float32)."""
    if isinstance(v, keras.Variable):
        v = v.value
    if dtype is None and isinstance(v, np.ndarray):
        dtype = str(v.dtype)
    return ops.convert_to_tensor(v, dtype=dtype)


def _check_times(t0, t1):
    """Non-finite ends would give a Solution that is neither a solve nor an error.

    Checked where the value is known while tracing (numbers, eager tensors,
    constants); a traced tensor is not known until the solve runs.
    """
    for name, t in (("t0", t0), ("t1", t1)):
        value = t if _is_number(t) else backend.static_value(_tensor(t))
        if value is None:
            continue
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{name} must be a finite number, got {value}")


def _check_resolution(settings, dtype):
    """ValueError for a tolerance the dtype cannot resolve (see RESOLVABLE_EPS)."""
    name = keras.backend.standardize_dtype(dtype)
    floor = RESOLVABLE_EPS * epsilon(name)
    for field in ("rtol", "atol"):
        value = getattr(settings, field)
        if value < floor:
            raise ValueError(f"{field}={value:g} is below what {name} resolves "
                             f"({RESOLVABLE_EPS} eps = {floor:.2g}): give {field} >= "
                             f"{floor:.2g} or a state of a wider dtype")


def _warn_if_narrowed(given, tensor):
    """A float64 y0 that the backend made narrower (JAX without JAX_ENABLE_X64): warn."""
    try:
        asked = keras.backend.standardize_dtype(given.dtype)
    except (AttributeError, TypeError, ValueError):
        return
    got = keras.backend.standardize_dtype(tensor.dtype)
    if asked == "float64" and got != "float64":
        warnings.warn(f"odeint: y0 is float64 but the {keras.backend.backend()} backend made it "
                      f"{got}, so the solve runs in {got} (on JAX, set JAX_ENABLE_X64=1 "
                      "before jax is imported to keep float64)", stacklevel=4)


def _validate(func, y0, t0, t1, error_control):
    """(y0 as a flat list of tensors, the error-control flag of each)."""
    if not callable(func):
        raise ValueError(f"func must be callable (t, y) -> dy/dt, got {type(func).__name__}")
    _check_times(t0, t1)
    if isinstance(y0, dict):
        raise ValueError("y0 must be a tensor or a tuple/list of tensors, got a dict")
    given = tree.flatten(y0)
    flat = [_tensor(v) for v in given]
    for v, t in zip(given, flat):
        _warn_if_narrowed(v, t)
    if not flat:
        raise ValueError("y0 must hold at least one tensor")
    dtypes = {str(ops.dtype(v)) for v in flat}
    for v in flat:
        if "float" not in str(ops.dtype(v)):
            raise ValueError(f"y0 must be floating point, got dtype {ops.dtype(v)}")
    if len(dtypes) > 1:
        raise ValueError(f"all states in y0 must share one dtype, got {sorted(dtypes)}")
    if error_control is None:
        return flat, [True] * len(flat)
    controlled = [bool(c) for c in tree.flatten(error_control)]
    if len(controlled) != len(flat):
        raise ValueError(f"error_control must match y0's structure: {len(flat)} "
                         f"states, got {len(controlled)} flags")
    if not any(controlled):
        raise ValueError("error_control must leave at least one state controlled")
    return flat, controlled


def _check_output(structure, y, out):
    try:
        flat_out = tree.flatten(out)
        tree.assert_same_structure(structure, out)
    except (ValueError, TypeError) as err:
        raise ValueError(f"func must return the structure of y0; got {type(out).__name__} "
                         f"for y0 of {type(structure).__name__}: {err}") from None
    for i, (a, b) in enumerate(zip(y, flat_out)):
        # Static shapes: an unknown (None) dimension, e.g. the batch of a
        # traced function with a None batch, agrees with anything.
        sa, sb = checks.static_shape(a), checks.static_shape(b)
        if not checks.shapes_agree(sa, sb):
            raise ValueError(f"func returned shape {sb} for state {i} "
                             f"of shape {sa}; dy/dt must have y's shape")
