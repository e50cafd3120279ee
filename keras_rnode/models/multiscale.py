"""The multiscale RNODE: FFJORD's ODENVP architecture, as the RNODE paper trains it on images.

    logit transform
    scale 0:  k CNF blocks, squeeze (H, W, C) -> (H/2, W/2, 4C), k CNF blocks,
              factor out half the channels (2C) to the base distribution
    scale 1:  the same on the remaining (H/2, W/2, 2C)
    ...
    last:     k CNF blocks; everything left goes to the base distribution

k = 2 in FFJORD and RNODE. log p(x) = sum over the factored-out parts and
the final part of log N(z_i; 0, I) + the logit log-det - the sum of every
block's delta_logp; bits/dim counts all of it over the D = H * W * C input
dimensions. The training loss sums each penalty over every block, as for
the single-scale model, whose code this reuses.
"""

import keras

from keras_rnode import checks
from keras_rnode.layers.cnf import CNF
from keras_rnode.layers import dynamics as nets
from keras_rnode.layers.space_to_depth import squeeze, unsqueeze
from keras_rnode.models.conv_dynamics import CONV_DYNAMICS
from keras_rnode.models.rnode import RNODE, flow_back, flow_through

DYNAMICS = {name: getattr(nets, cls) for name, cls in CONV_DYNAMICS.items()}


def default_scales(height, width):
    """FFJORD's count: one scale per halving while both sides are >= 4 (and even)."""
    n = 0
    while height >= 4 and width >= 4:
        n += 1
        if height % 2 or width % 2:
            break
        height, width = height // 2, width // 2
    return max(n, 1)


def blocks_needed(n_scales, blocks_per_scale):
    """k blocks before and k after the squeeze at every scale but the last, which has k."""
    return (2 * n_scales - 1) * blocks_per_scale


@keras.saving.register_keras_serializable(package="keras_rnode")
class MultiscaleRNODE(RNODE):
    """RNODE on images with FFJORD's multiscale architecture.

    Args:
        blocks: the CNF blocks in flow order, (2 * n_scales - 1) *
            blocks_per_scale of them (see `multiscale_rnode` to build them).
        n_scales: number of scales; the image's height and width must be
            divisible by 2 ** (n_scales - 1).
        kinetic, jacobian, regularizers, levels, logit_alpha, seed: as for
            `RNODE`; the logit transform is on by default (alpha 1e-6, FFJORD's).

    Same surface as `RNODE`: fit logs bpd (or nll), each penalty, nfe;
    `log_prob`, `bits_per_dim`, `penalties`, `sample`, `encode`/`decode`
    (the latent is a list of parts, `latent_shapes`), `export`, and saving
    through `get_config`.
    """

    def __init__(self, blocks, n_scales, kinetic=None, jacobian=None, levels=None,
                 logit_alpha=1e-6, seed=None, regularizers=None, **kwargs):
        super().__init__(blocks, kinetic=kinetic, jacobian=jacobian, levels=levels,
                         logit_alpha=logit_alpha, seed=seed, regularizers=regularizers,
                         **kwargs)
        n_scales = checks.integer(n_scales, "n_scales")
        per, rest = divmod(len(self.blocks), 2 * n_scales - 1)
        if rest or not per:
            raise ValueError(
                f"{n_scales} scales need (2 * n_scales - 1) * k blocks, k per group "
                f"(k before and k after each squeeze, k at the last scale); got "
                f"{len(self.blocks)}")
        self.n_scales = n_scales
        self.blocks_per_scale = per

    def _plan(self):
        """Per scale: (blocks before the squeeze, blocks after it or None at the last)."""
        k, groups = self.blocks_per_scale, []
        for i in range(self.n_scales):
            start = 2 * k * i
            after = None if i == self.n_scales - 1 else self.blocks[start + k:start + 2 * k]
            groups.append((self.blocks[start:start + k], after))
        return groups

    def build(self, input_shape):
        input_shape = self._data_shape(input_shape)
        if len(input_shape) != 4 or None in tuple(input_shape[1:]):
            raise ValueError("MultiscaleRNODE takes images (batch, height, width, channels) "
                             f"of known size, got shape {tuple(input_shape)}")
        self.event_shape = tuple(input_shape[1:])
        h, w, c = self.event_shape
        if h % 2 ** (self.n_scales - 1) or w % 2 ** (self.n_scales - 1):
            raise ValueError(f"{self.n_scales} scales squeeze {self.n_scales - 1} times: "
                             f"height and width must be divisible by "
                             f"{2 ** (self.n_scales - 1)}, got {h}x{w}")
        shapes = []
        for before, after in self._plan():
            _build(before, (None, h, w, c))
            if after is None:
                break
            h, w, c = h // 2, w // 2, 4 * c
            _build(after, (None, h, w, c))
            shapes.append((h, w, c - c // 2))
            c //= 2
        self._shapes = shapes + [(h, w, c)]
        self.built = True

    def _forward(self, x, **call_options):
        latents, delta, sums = [], 0.0, {}
        for before, after in self._plan():
            x, delta, sums = flow_through(before, x, delta, sums, **call_options)
            if after is None:
                break
            x = squeeze(x)
            x, delta, sums = flow_through(after, x, delta, sums, **call_options)
            half = x.shape[-1] // 2
            latents.append(x[..., half:])
            x = x[..., :half]
        return latents + [x], delta, sums

    def _inverse(self, latents, context=None):
        x, delta = latents[-1], 0.0
        for i, (before, after) in reversed(list(enumerate(self._plan()))):
            if after is not None:
                x = keras.ops.concatenate([x, latents[i]], axis=-1)
                x, delta = flow_back(after, x, context, delta)
                x = unsqueeze(x)
            x, delta = flow_back(before, x, context, delta)
        return x, delta

    @property
    def latent_shapes(self):
        """Per scale the factored-out part's shape, then the last scale's (h, w, c)."""
        return list(self._shapes)

    def get_config(self):
        config = super().get_config()
        config["n_scales"] = self.n_scales
        return config


def _build(blocks, shape):
    for block in blocks:
        # Deserialized blocks arrive built; building again would add weights twice.
        if not block.built:
            block.build(shape)


def multiscale_rnode(image_shape, channels=(64, 64, 64), blocks_per_scale=2, n_scales=None,
                     dynamics="concat", kernel_size=3, activation="softplus", kinetic=None,
                     jacobian=None, levels=256, logit_alpha=1e-6, seed=None, dtype=None,
                     regularizers=None, objective="likelihood", **cnf_options):
    """A MultiscaleRNODE for images of `image_shape` (height, width, channels).

    Every CNF block gets its own conv dynamics net (`dynamics`: "concat",
    FFJORD's and RNODE's choice for images, or "concatsquash") of
    `channels` 3x3 convolutions with softplus between them; kinetic,
    jacobian and regularizers are RNODE's penalty weights. n_scales
    defaults to FFJORD's count (3 for 28x28 MNIST, 4 for 32x32 CIFAR-10, 2
    for 8x8 digits). `cnf_options` go to every `keras_rnode.layers.CNF`
    (trace, method, step_size, rtol, atol, eval_method, ...). `objective`
    is the likelihood: flow matching is refused with the reason (ValueError).
    """
    height, width, _ = image_shape
    n_scales = n_scales or default_scales(height, width)
    if dynamics not in DYNAMICS:
        raise ValueError(f"dynamics must be one of {sorted(DYNAMICS)}, got {dynamics!r}")
    blocks = []
    for i in range(blocks_needed(n_scales, blocks_per_scale)):
        net = DYNAMICS[dynamics](channels=channels, kernel_size=kernel_size,
                                 activation=activation, dtype=dtype)
        blocks.append(CNF(net, seed=None if seed is None else seed + i, dtype=dtype,
                          **cnf_options))
    model = MultiscaleRNODE(blocks, n_scales, kinetic=kinetic, jacobian=jacobian,
                            regularizers=regularizers, objective=objective, levels=levels,
                            logit_alpha=logit_alpha, seed=seed, dtype=dtype)
    model.build((None, *image_shape))
    return model
