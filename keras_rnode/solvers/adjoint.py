"""Adjoint gradient: solve the adjoint ODE backwards from t1 to t0.

With a(t) = dL/dy(t): dy/dt = f, da/dt = -a^T df/dy, and
dg/dt = -a^T df/dtheta with g(t1) = 0, so that a(t0) = dL/dy0 and
g(t0) = dL/dtheta. Memory does not grow with the number of steps. Error
control covers y (as in the forward solve) and a; the parameter adjoint g
never feeds back into the dynamics, so leaving it out of the norm (a
"seminorm") saves steps without hurting the gradient.
"""

from keras import ops

from keras_rnode import backend
from keras_rnode.solvers.integrate import integrate, is_empty


def adjoint_backward(func_p, params, settings, y1, t0, t1, grads_y1, controlled):
    """func_p(t, y, params) is the dynamics; returns (grads_y0, grads_params,
    stats of the backward solve).

    The backward solve uses the forward solve's settings whole, but for its
    first step: the forward one was chosen for the other end. An empty y
    (an empty batch) takes no step: every adjoint derivative is a sum over
    its entries, so y, a and g stay where they start.
    """
    n = len(y1)
    m = len(params)

    def augmented(t, state):
        y, a = state[:n], state[n:2 * n]
        f, grads_y, grads_p = backend.vjp(lambda y_, p: func_p(t, y_, p), y, params, a)
        return [*f, *[-v for v in grads_y], *[-v for v in grads_p]]

    state1 = [*y1, *grads_y1, *[ops.zeros_like(v) for v in params]]
    controlled = [*controlled, *([True] * n), *([False] * m)]
    state0, stats, _ = integrate(augmented, settings.replace(first_step=None), state1, t1, t0,
                                 controlled=controlled, record=False, idle=is_empty(y1))
    return state0[n:2 * n], state0[2 * n:], stats
