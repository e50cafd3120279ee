"""`odeint`: the public entry point of the solver."""

import math
import numbers

import numpy as np
from keras import ops
from keras import tree

from keras_rnode import backend
from keras_rnode.solvers.adjoint import adjoint_backward
from keras_rnode.solvers.direct import direct_backward
from keras_rnode.solvers.integrate import integrate
from keras_rnode.solvers.solution import Solution, Status
from keras_rnode.solvers.tableaus import TABLEAUS

GRADIENTS = ("adjoint", "direct", "none")
STAT_NAMES = ("nfe", "accepted", "rejected", "status")


def odeint(func, y0, t0=0.0, t1=1.0, method="dopri5", rtol=1e-5, atol=1e-5,
           max_steps=1000, gradient="adjoint", step_size=None, first_step=None,
           error_control=None, on_backward=None):
    """Integrate dy/dt = func(t, y) from t0 to t1 (t1 < t0 runs backwards).

    Args:
        func: callable (t, y) -> dy/dt with the structure and shapes of y.
        y0: a floating tensor or a tuple/list of them (any shapes).
        method: "dopri5" (adaptive), "rk4" or "euler" (fixed step).
        rtol, atol: tolerances of the adaptive method.
        max_steps: bound on attempted steps; reaching it ends the solve with
            status "max_steps_reached".
        gradient: "adjoint" (memory flat in the number of steps), "direct"
            (backpropagation through the accepted steps) or "none".
        step_size: the step of a fixed-step method (required for them).
        first_step: the first step of dopri5 (default: Hairer's heuristic).
        error_control: booleans in the structure of y0; False leaves that
            state out of step-size control (default: all controlled).
        on_backward: called with the backward solve's stats dict (adjoint
            only) when gradients are computed; not on JAX, whose custom
            gradients cannot have side effects. A backward solve that fails
            (max_steps, step underflow) gives NaN gradients.

    Returns:
        A `Solution` with `y` (structure of y0) and `stats`.
    """
    tableau, flat_y0, controlled = _validate(
        func, y0, t0, t1, method, rtol, atol, max_steps, gradient, step_size, first_step,
        error_control)
    structure = y0

    def flat_func(t, y):
        out = func(t, tree.pack_sequence_as(structure, y))
        _check_output(structure, y, out)
        return tree.flatten(out)

    options = dict(rtol=rtol, atol=atol, max_steps=max_steps, step_size=step_size,
                   controlled=controlled)

    def forward(f, y0_list):
        return integrate(f, tableau, y0_list, t0, t1, first_step=first_step,
                         record=gradient == "direct", **options)

    def backward(func_p, params, records, y1, grads_y1):
        if gradient == "direct":
            return direct_backward(func_p, params, tableau, t0, t1, records, grads_y1)
        grads_y0, grads_p, stats = adjoint_backward(
            func_p, params, tableau, y1, t0, t1, grads_y1, options)
        if on_backward is not None and backend.REPORTS_BACKWARD:
            on_backward(dict(zip(STAT_NAMES, stats)))
        # A backward solve that stopped short of t0 has no gradient to give:
        # NaN shows it (and lets a NaN-skipping optimizer skip the step)
        # where the adjoint reached would pass for one.
        ok = stats[3] == Status.SUCCESS
        return tuple([ops.where(ok, g, ops.full_like(g, float("nan"))) for g in grads]
                     for grads in (grads_y0, grads_p))

    y1, stats = backend.differentiable_solve(
        flat_func, flat_y0, forward, None if gradient == "none" else backward)
    return Solution(y=tree.pack_sequence_as(structure, y1),
                    stats=dict(zip(STAT_NAMES, stats)))


def check_options(method="dopri5", rtol=1e-5, atol=1e-5, max_steps=1000, gradient="adjoint",
                  step_size=None, first_step=None, names=None):
    """Check odeint's solver options; returns the method's tableau.

    Raises ValueError naming the argument, the value given and what is
    allowed. Layers that hold solver options (CNF) call it when they are
    made, so that a bad option fails there and not at the first solve;
    `names` maps an option to the name their caller knows it by (CNF's
    "eval_rtol" for rtol).
    """
    names = names or {}

    def name(arg):
        return names.get(arg, arg)

    if not isinstance(method, str) or method not in TABLEAUS:
        raise ValueError(f"{name('method')} must be one of {sorted(TABLEAUS)}, got {method!r}")
    tableau = TABLEAUS[method]
    if gradient not in GRADIENTS:
        raise ValueError(f"{name('gradient')} must be one of {GRADIENTS}, got {gradient!r}")
    for arg, value in (("rtol", rtol), ("atol", atol)):
        if not _positive_finite(value):
            raise ValueError(f"{name(arg)} must be a positive finite number, got {value!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral) \
            or max_steps < 1:
        raise ValueError(f"{name('max_steps')} must be an integer >= 1, got {max_steps!r}")
    if tableau.adaptive:
        if step_size is not None:
            raise ValueError(f"{name('step_size')} is for the fixed-step methods "
                             f"{sorted(m for m, t in TABLEAUS.items() if not t.adaptive)}; "
                             f"{method!r} chooses its own steps (use first_step), "
                             f"got {name('step_size')}={step_size!r}")
        if first_step is not None and not _positive_finite(first_step):
            raise ValueError(f"{name('first_step')} must be a positive finite number or "
                             f"None, got {first_step!r}")
    elif not _positive_finite(step_size):
        raise ValueError(f"{name('step_size')} must be a positive finite number for the "
                         f"fixed-step {name('method')} {method!r}, got {step_size!r}")
    return tableau


def _positive_finite(value):
    # Not bool: True would pass as the number 1.
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


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


def _validate(func, y0, t0, t1, method, rtol, atol, max_steps, gradient, step_size,
              first_step, error_control):
    if not callable(func):
        raise ValueError(f"func must be callable (t, y) -> dy/dt, got {type(func).__name__}")
    tableau = check_options(method, rtol, atol, max_steps, gradient, step_size, first_step)
    _check_times(t0, t1)
    if not isinstance(y0, (tuple, list)) and isinstance(y0, (dict,)):
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
        controlled = [True] * len(flat)
    else:
        controlled = [bool(c) for c in tree.flatten(error_control)]
        if len(controlled) != len(flat):
            raise ValueError(f"error_control must match y0's structure: {len(flat)} "
                             f"states, got {len(controlled)} flags")
        if not any(controlled):
            raise ValueError("error_control must leave at least one state controlled")
    return tableau, flat, controlled


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
        sa, sb = tuple(a.shape), tuple(b.shape)
        if len(sa) != len(sb) or any(p is not None and q is not None and p != q
                                     for p, q in zip(sa, sb)):
            raise ValueError(f"func returned shape {sb} for state {i} "
                             f"of shape {sa}; dy/dt must have y's shape")
