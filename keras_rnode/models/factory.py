"""An RNODE for data of a given shape: the model `rnode train` builds from its options."""

# keras is imported when used, so that the command line's help loads without it.

ARCHITECTURES = ("single", "multiscale")
DEFAULT_HIDDEN = (64, 64, 64)


def build_model(event_shape, levels, *, hidden, blocks, kinetic, jacobian, logit_alpha, seed,
                solver, eval_solver, trace, eval_trace=None, noise="gaussian",
                architecture="single", layer_type=None):
    """An RNODE of `blocks` CNF blocks: MLP dynamics for flat data, conv dynamics for images.

    `solver` and `eval_solver` (SolverSettings) integrate every block in
    training and in evaluation. `levels` (grey levels) marks image data,
    which is dequantized and logit-transformed in front of the flow.

    architecture="multiscale" (images): FFJORD's multiscale model with
    `blocks` blocks before and after each squeeze and at the last scale.
    `layer_type` names the conv dynamics (`multiscale.DYNAMICS`); by
    default "concat" (the paper's) multiscale, "concatsquash" single-scale.
    """
    from keras_rnode.layers.cnf import CNF
    from keras_rnode.layers.dynamics import ConcatSquashMLP
    from keras_rnode.models.multiscale import DYNAMICS, multiscale_rnode
    from keras_rnode.models.rnode import RNODE

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    cnf_options = dict(trace=trace, noise=noise, eval_trace=eval_trace, solver=solver,
                       eval_solver=eval_solver)
    rnode_options = dict(kinetic=kinetic, jacobian=jacobian, levels=levels,
                          logit_alpha=logit_alpha if levels else None, seed=seed)
    if architecture == "multiscale":
        if len(event_shape) != 3:
            raise ValueError(f"the multiscale architecture needs images, got data of event "
                             f"shape {event_shape}")
        return multiscale_rnode(event_shape, channels=hidden, blocks_per_scale=blocks,
                                dynamics=layer_type or "concat", **rnode_options,
                                **cnf_options)
    if len(event_shape) == 3:
        def dynamics():
            return DYNAMICS[layer_type or "concatsquash"](channels=hidden)
    elif len(event_shape) == 1:
        def dynamics():
            return ConcatSquashMLP(hidden=hidden)
    else:
        raise ValueError(f"data of event shape {event_shape} is neither flat vectors nor "
                         "(height, width, channels) images")
    cnfs = [CNF(dynamics(), seed=seed + i, **cnf_options) for i in range(blocks)]
    return RNODE(cnfs, **rnode_options)
