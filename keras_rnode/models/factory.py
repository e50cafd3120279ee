"""An RNODE for data of a given shape: the model `rnode train` builds from its options."""

import math

# keras is imported when used, so that the command line's help loads without it.

ARCHITECTURES = ("auto", "single", "dense", "multiscale")
DEFAULT_HIDDEN = (64, 64, 64)
# A dense net on a flattened image needs width where a conv net needs depth.
DEFAULT_DENSE_IMAGE_HIDDEN = (256, 256)
# Images of at most this many values (the 8x8 digits: 64) are modelled with
# dense dynamics; a 28x28 MNIST image (784) is the multiscale model's.
DENSE_MAX_DIM = 256


# The activations of the dynamics `rnode train --activation` offers ("auto": by objective).
ACTIVATIONS = ("auto", "softplus", "silu", "tanh", "elu", "gelu")


def default_activation(objective):
    """The activation of the dynamics for `objective` ("likelihood" or "flow_matching").

    Likelihood: softplus, the paper's. Flow matching: SiLU. On softplus nets
    flow matching sat on a plateau (8gaussians: 4.13 nats held out after 1000
    steps, 3.43 after 2000) where SiLU's were at 3.15 and 3.01 (benchmarks/
    RESULTS.md, "Flow matching"); the fine-tune by likelihood keeps the net.
    """
    return "silu" if objective == "flow_matching" else "softplus"


def architecture_for(event_shape):
    """What `architecture="auto"` builds for data of `event_shape`.

    Flat data: "single" (dense dynamics either way). Images of at most
    DENSE_MAX_DIM values: "dense", which on the digits reached 2.2 bits/dim
    in 1200 steps where the conv chain was at 5.8 after 30 (benchmarks/
    RESULTS.md, "Digits: the default run"); larger images: "multiscale",
    the paper's model for MNIST and CIFAR-10.
    """
    if len(event_shape) != 3:
        return "single"
    return "dense" if math.prod(event_shape) <= DENSE_MAX_DIM else "multiscale"


def default_hidden(architecture, event_shape):
    """The widths of the dynamics when --hidden is not given."""
    if architecture == "dense" and len(event_shape) == 3:
        return DEFAULT_DENSE_IMAGE_HIDDEN
    return DEFAULT_HIDDEN


def build_model(event_shape, levels, *, hidden, blocks, regularizers, logit_alpha, seed,
                solver, eval_solver, trace, eval_trace=None, noise="gaussian",
                architecture="single", layer_type=None, objective="likelihood",
                activation="auto"):
    """An RNODE of `blocks` CNF blocks: MLP dynamics for flat data, conv dynamics for images.

    `regularizers`: the penalty weights, {name: weight} (`RNODE`); `objective`
    the training objective, as `RNODE` takes it (`keras_rnode.objectives`);
    `activation` the dynamics' ("auto": `default_activation(objective)`).
    `solver` and `eval_solver` (SolverSettings) integrate every block in
    training and in evaluation. `levels` (grey levels) marks image data,
    which is dequantized and logit-transformed in front of the flow.

    `architecture` (images; flat data always has dense dynamics): "single",
    a chain of CNF blocks with conv dynamics; "dense", the same chain with
    dense dynamics on the flattened image (`layers.dynamics.Flattened`);
    "multiscale", FFJORD's multiscale model with `blocks` blocks before and
    after each squeeze and at the last scale; "auto", `architecture_for`'s
    choice. `layer_type` names the conv dynamics (`multiscale.DYNAMICS`);
    by default "concat" (the paper's) multiscale, "concatsquash"
    single-scale. Raises ValueError for an unknown architecture, a
    multiscale model of flat data, or data neither flat nor images.
    """
    from keras_rnode.layers.cnf import CNF
    from keras_rnode.layers.dynamics import ConcatSquashMLP, Flattened
    from keras_rnode.models.multiscale import DYNAMICS, multiscale_rnode
    from keras_rnode.models.rnode import RNODE

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    if architecture == "auto":
        architecture = architecture_for(event_shape)
    if activation == "auto":
        from keras_rnode import objectives

        activation = default_activation(objectives.get(objective).name)
    cnf_options = dict(trace=trace, noise=noise, eval_trace=eval_trace, solver=solver,
                       eval_solver=eval_solver)
    rnode_options = dict(regularizers=dict(regularizers), levels=levels,
                         logit_alpha=logit_alpha if levels else None, seed=seed,
                         objective=objective)
    if architecture == "multiscale":
        if len(event_shape) != 3:
            raise ValueError(f"the multiscale architecture needs images, got data of event "
                             f"shape {event_shape}")
        return multiscale_rnode(event_shape, channels=hidden, blocks_per_scale=blocks,
                                dynamics=layer_type or "concat", activation=activation,
                                **rnode_options, **cnf_options)
    if len(event_shape) == 3 and architecture == "dense":
        def dynamics():
            return Flattened(ConcatSquashMLP(hidden=hidden, activation=activation))
    elif len(event_shape) == 3:
        def dynamics():
            return DYNAMICS[layer_type or "concatsquash"](channels=hidden, activation=activation)
    elif len(event_shape) == 1:
        def dynamics():
            return ConcatSquashMLP(hidden=hidden, activation=activation)
    else:
        raise ValueError(f"data of event shape {event_shape} is neither flat vectors nor "
                         "(height, width, channels) images")
    cnfs = [CNF(dynamics(), seed=seed + i, **cnf_options) for i in range(blocks)]
    return RNODE(cnfs, **rnode_options)
