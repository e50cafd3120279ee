"""Particle paths z(t) of a trained flow, from the data (t = 0) to the noise (t = T).

RNODE's kinetic regularizer makes these paths nearly straight lines; an
unregularized flow's wander. `trajectories` computes them with the model's
own blocks and evaluation solver, `length_ratio` measures how far they are
from straight, and `keras_rnode.plots.plot_trajectories` draws them.
"""

import numpy as np

# keras is imported when used, so that the command line's help loads without it.

# The pieces of each block's [0, T] a path is drawn through, unless told.
STEPS = 20


def trajectories(model, x, steps=STEPS, context=None):
    """Positions of the rows of x along the model's flow; (blocks * steps + 1, n, *event_shape).

    Each CNF block carries the points over `steps` equal pieces of its
    [0, T], every piece solved with the block's evaluation solver from
    where the last one ended (no gradient, no trace); the blocks follow
    one another. [0] is x and [-1] the model's z, to the solver's
    tolerance. A conditional model takes the `context` of every row.
    Continuous data only: an image model's flow starts after its
    dequantization and logit transform.
    """
    from keras import ops

    from keras_rnode.solvers import odeint

    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not model.built:
        raise ValueError("the model is not built: train it, call it on data, or load a "
                         "trained one before drawing its trajectories")
    if model.levels:
        raise ValueError("trajectories are drawn for continuous data; this model's flow "
                         "starts after the dequantization of its images")
    x = np.asarray(x, np.float32)
    if x.shape[1:] != tuple(model.event_shape):
        raise ValueError(f"the model takes events of shape {tuple(model.event_shape)}, the "
                         f"data has shape {x.shape[1:]}")
    conditioned = {} if context is None else {"args": ops.convert_to_tensor(context, "float32")}
    z = ops.convert_to_tensor(x)
    positions = [x]
    for block in model.blocks:
        solver = block.eval_solver.replace(gradient="none")
        end = float(ops.convert_to_numpy(block.end_time))

        def velocity(t, y, *context_, dynamics=block.dynamics):
            return dynamics(t, y, *context_)

        for k in range(steps):
            z = odeint(velocity, z, end * k / steps, end * (k + 1) / steps, solver=solver,
                       **conditioned).y
            positions.append(np.asarray(ops.convert_to_numpy(z)))
    return np.stack(positions)


def length_ratio(paths):
    """Mean path length over mean displacement (1 for straight lines, more as paths bend).

    `paths`: (times, n, *event_shape), as `trajectories` returns them. A
    ratio of means, so that points that hardly move do not dominate it.
    """
    paths = np.asarray(paths, np.float64)
    paths = paths.reshape(paths.shape[0], paths.shape[1], -1)
    length = np.linalg.norm(np.diff(paths, axis=0), axis=-1).sum(axis=0)
    displacement = np.linalg.norm(paths[-1] - paths[0], axis=-1)
    return float(np.mean(length) / np.mean(displacement))
