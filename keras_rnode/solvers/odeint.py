"""`odeint`: the public entry point of the solver."""

import numbers

import numpy as np
from keras import ops
from keras import tree

from keras_rnode import backend, checks
from keras_rnode.solvers.adjoint import adjoint_backward
from keras_rnode.solvers.direct import direct_backward
from keras_rnode.solvers.integrate import integrate
from keras_rnode.solvers.solution import Solution, Status
from keras_rnode.solvers.settings import resolve

STAT_NAMES = ("nfe", "accepted", "rejected", "status")


def odeint(func, y0, t0=0.0, t1=1.0, *, solver=None, error_control=None, on_backward=None,
           **options):
    """Integrate dy/dt = func(t, y) from t0 to t1 (t1 < t0 runs backwards).

    Args:
        func: callable (t, y) -> dy/dt with the structure and shapes of y.
        y0: a floating tensor or a tuple/list of them (any shapes, one dtype).
        t0, t1: the ends (finite numbers or scalar tensors).
        solver: a `SolverSettings`; or give its fields as keywords:
            method ("dopri5" adaptive, "rk4" or "euler" fixed-step),
            rtol, atol, step_size (fixed-step methods), max_steps,
            gradient ("adjoint", "direct" or "none"), first_step,
            controller. Keywords given with `solver` replace its fields.
        error_control: booleans in the structure of y0; False leaves that
            state out of step-size control (default: all controlled).
        on_backward: called with the backward solve's stats dict (adjoint
            only) when gradients are computed; not on JAX, whose custom
            gradients cannot have side effects. A backward solve that fails
            (max_steps, step underflow) gives NaN gradients.

    Returns:
        A `Solution` with `y` (structure of y0) and `stats`.

    Raises:
        ValueError for a bad y0, func, end time or setting (naming it);
        TypeError for a keyword that is not a solver setting.
    """
    settings = resolve(solver, options)
    flat_y0, controlled = _validate(func, y0, t0, t1, error_control)
    structure = y0

    def flat_func(t, y):
        out = func(t, tree.pack_sequence_as(structure, y))
        _check_output(structure, y, out)
        return tree.flatten(out)

    def forward(f, y0_list):
        return integrate(f, settings, y0_list, t0, t1, controlled=controlled,
                         record=settings.gradient == "direct")

    def backward(func_p, params, records, y1, grads_y1):
        if settings.gradient == "direct":
            return direct_backward(func_p, params, settings.tableau, t0, t1, records,
                                   grads_y1)
        grads_y0, grads_p, stats = adjoint_backward(
            func_p, params, settings, y1, t0, t1, grads_y1, controlled)
        if on_backward is not None and backend.REPORTS_BACKWARD:
            on_backward(dict(zip(STAT_NAMES, stats)))
        # A backward solve that stopped short of t0 has no gradient to give:
        # NaN shows it (and lets a NaN-skipping optimizer skip the step)
        # where the adjoint reached would pass for one.
        ok = stats[3] == Status.SUCCESS
        return tuple([ops.where(ok, g, ops.full_like(g, float("nan"))) for g in grads]
                     for grads in (grads_y0, grads_p))

    y1, stats = backend.differentiable_solve(
        flat_func, flat_y0, forward, None if settings.gradient == "none" else backward)
    return Solution(y=tree.pack_sequence_as(structure, y1),
                    stats=dict(zip(STAT_NAMES, stats)))


def _check_times(t0, t1):
    """Non-finite ends would give a Solution that is neither a solve nor an error.

    Checked where the value is known while tracing (numbers, eager tensors,
    constants); a traced tensor is not known until the solve runs.
    """
    for name, t in (("t0", t0), ("t1", t1)):
        value = t if isinstance(t, numbers.Real) else backend.static_value(t)
        if value is None:
            continue
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{name} must be a finite number, got {value}")


def _validate(func, y0, t0, t1, error_control):
    """(y0 as a flat list of tensors, the error-control flag of each)."""
    if not callable(func):
        raise ValueError(f"func must be callable (t, y) -> dy/dt, got {type(func).__name__}")
    _check_times(t0, t1)
    if isinstance(y0, dict):
        raise ValueError("y0 must be a tensor or a tuple/list of tensors, got a dict")
    # NumPy arrays keep their dtype (Keras's PyTorch backend would make
    # float64 into float32).
    flat = [ops.convert_to_tensor(v, dtype=str(v.dtype) if isinstance(v, np.ndarray) else None)
            for v in tree.flatten(y0)]
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
