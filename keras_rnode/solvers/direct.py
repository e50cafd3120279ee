"""Direct gradient: backpropagation through the accepted steps, in reverse.

The forward solve records the state at the start of every accepted step;
here each step is recomputed under a tape and its vector-Jacobian product
carries the cotangent back one step. This is exactly the gradient of the
discrete solve (step sizes held fixed), with memory of one state per step
rather than every stage's activations.
"""

from keras import ops

from keras_rnode import backend
from keras_rnode.solvers.integrate import time_frame
from keras_rnode.solvers.stepping import rk_step


def direct_backward(func_p, params, tableau, t0, t1, records, grads_y1):
    """func_p(t, y, params) is the dynamics; returns (grads_y0, grads_params)."""
    recorder, count = records
    t0, direction, _ = time_frame(t0, t1, grads_y1[0].dtype)
    n = len(grads_y1)

    def cond(i, a, g):
        return i >= 0

    def body(i, a, g):
        sh, *y = backend.recorder_read(recorder, i)
        t = t0 + direction * sh[0]
        h = direction * sh[1]

        def step(y_, p):
            func = lambda t_, y__: func_p(t_, y__, p)  # noqa: E731
            y_new, _, _ = rk_step(func, tableau, t, y_, h, func(t, y_), with_error=False)
            return y_new

        _, grads_y, grads_v = backend.vjp(step, y, params, a)
        return i - 1, list(grads_y), [gi + vi for gi, vi in zip(g, grads_v)]

    zeros_v = [ops.zeros_like(v) for v in params]
    _, a, g = ops.while_loop(cond, body, (count - 1, list(grads_y1), zeros_v))
    return a[:n], g
