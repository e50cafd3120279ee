"""TensorFlow Probability's face of a trained RNODE: a bijector and a distribution.

    from keras_rnode.distributions import RNODEBijector, as_distribution
    dist = as_distribution(model)       # or model.as_distribution()
    dist.log_prob(x)                    # == model.log_prob(x)
    dist.sample(1000)                   # distributed as model.sample(1000)

`RNODEBijector(model)` maps base noise z to data x, as TFP's bijectors of a
flow do: its forward is the model's generative direction (the CNF blocks
solved from t = T back to 0, then the logit transform's inverse), its
inverse the model's density direction (`model.log_prob`'s solves). Each
direction's log-det comes from the solves that direction makes: the blocks'
delta_logp and the logit log-det, with the model's evaluation solver and
trace. `as_distribution(model)` puts it over a standard normal of the
model's event shape, a `tfp.distributions.TransformedDistribution`.

The latent. A multiscale model's latent is a list of parts (the channels
factored out at each scale, then what is left at the last one). Here they
are one tensor of the model's event shape: each part flattened row-major
(channels last), the parts concatenated in `model.latent_shapes` order
(scale 0's factored-out part first, the last scale's part last) and the
result reshaped to the event shape (`pack`, `unpack`). The base density is the same either
way, so `log_prob` agrees with the model's; only which entry of z feeds
which part of the flow is a convention.

Images with `levels`. The model's density is of the dequantized y = (x +
u) / L in [0, 1)^D (see `keras_rnode.layers.transforms`), and so is this
distribution's: `log_prob` takes y, not the integer image (to score x as
`model.log_prob` does, draw u ~ U[0, 1) and pass (x + u) / L; bits/dim is
`keras_rnode.layers.transforms.bits_per_dim(dist.log_prob(y), D, L)`), and
`sample` returns continuous y, where `model.sample` floors to grey levels.

Determinism. `log_prob` runs the model's own evaluation solves, so it is
exactly as deterministic as `model.log_prob`: the exact trace draws nothing,
while a Hutchinson evaluation trace draws probes on every call (whether they
repeat from call to call is the CNF layer's rule), and the forward and the
inverse direction then draw their own, so that forward_log_det_jacobian(z)
= -inverse_log_det_jacobian(x) holds only in expectation. Use
`trace="exact"` (or `eval_trace="exact"`) where the event is small.

Caching. Like TFP's FFJORD, a forward or inverse call stores its log-det in
TFP's bijector cache beside its input and output, so that `log_prob` costs
one pass of solves rather than two. The entry lives as long as the tensors
it links; nothing else is kept, and every forward or inverse call solves
afresh (a stale entry is dropped first), so `dist.log_prob(x)` follows the
model's current weights on every call. A log-det asked of a tensor that an
earlier call produced comes from that call's solves.

TensorFlow backend only: importing this module under another Keras backend
raises ImportError. TensorFlow Probability is imported here, never by
`import keras_rnode`.
"""

import math

import keras


def require_tensorflow():
    """Raise ImportError unless Keras runs on TensorFlow, which TFP needs."""
    name = keras.backend.backend()
    if name != "tensorflow":
        raise ImportError(
            "keras_rnode.distributions (the TensorFlow Probability face: RNODEBijector, "
            f"as_distribution) needs the TensorFlow backend; Keras runs on {name!r}. Set "
            "KERAS_BACKEND=tensorflow before importing Keras, or load the model's .keras "
            "file in a TensorFlow process.")


require_tensorflow()

import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402

# TFP's own FFJORD shares a solve between a value and its log-det through
# this cache (internal to TFP: the one private TFP name used here).
from tensorflow_probability.python.internal.cache_util import (  # noqa: E402
    BijectorCacheWithGreedyAttrs,
)

__all__ = ["RNODEBijector", "as_distribution"]

def check_model(model):
    """Raise unless `model` is a built, unconditional RNODE (anything with its surface).

    TypeError: no `encode`/`decode`/`latent_shapes` (not an RNODE).
    ValueError: not built, or conditional.
    """
    if not all(hasattr(type(model), name) for name in ("encode", "decode", "latent_shapes")):
        raise TypeError(f"expected a keras_rnode.RNODE (a model with encode, decode and "
                        f"latent_shapes), got {type(model).__name__}")
    if not model.built:
        raise ValueError("the model must be built (called on data, or trained) before it "
                         "can be a distribution: its event shape is not known yet")
    if model.conditional:
        raise ValueError("a conditional model is a distribution only given a context; "
                         "as_distribution takes unconditional models (use "
                         "model.log_prob(x, context) and model.sample(n, context))")


def pack(latents):
    """Latent parts (n, *shape_i) -> (n, sum of their sizes), each flattened row-major."""
    rows = tf.shape(latents[0])[0]
    return tf.concat([tf.reshape(part, (rows, -1)) for part in latents], axis=1)


def unpack(z, shapes):
    """The inverse of `pack`: z (n, ...) of sum_i prod(shapes[i]) entries per row -> parts."""
    sizes = [math.prod(shape) for shape in shapes]
    parts = tf.split(tf.reshape(z, (-1, sum(sizes))), sizes, axis=1)
    return [tf.reshape(part, (-1, *shape)) for part, shape in zip(parts, shapes)]


class RNODEBijector(tfp.bijectors.AutoCompositeTensorBijector):
    """A trained RNODE as a `tfp.bijectors.Bijector` from base noise z to data x.

    Args:
        model: a built, unconditional `keras_rnode.RNODE` or `MultiscaleRNODE`
            (TensorFlow backend).
        validate_args: TFP's flag (no extra checks are made).
        name: the bijector's name.

    forward(z) -> x and inverse(x) -> z take tensors of shape (*batch,
    *event_shape) in the model's compute dtype (float32 unless the model
    was built otherwise) and return the same shape; the log-dets are in
    nats, of shape batch (forward_min_event_ndims = len(event_shape)):
    forward_log_det_jacobian(z) = log |det dx/dz| from the inverse solves,
    inverse_log_det_jacobian(x) = log |det dz/dx| from the forward solves
    (so log p(x) = log N(z) + inverse_log_det_jacobian(x), which is
    `model.log_prob`'s sum). Every solve uses the blocks' evaluation
    solver and trace. For images with levels, x is the dequantized y in
    [0, 1)^D; a multiscale latent is packed into one tensor (see the module
    docstring for both).

    A CompositeTensor (the model rides in its type spec), so the bijector
    and a distribution built on it pass into `tf.function`s.

    Raises TypeError or ValueError (see `check_model`) for a model it cannot
    represent, and ValueError for input whose trailing shape is not the
    event shape.
    """

    # Each solve returns its log-det beside its value, so a value call and
    # the log-det query that follows it share one pass (TFP's FFJORD does so).
    _cache = BijectorCacheWithGreedyAttrs(forward_name="_forward_and_log_det",
                                          inverse_name="_inverse_and_log_det")

    def __init__(self, model, validate_args=False, name="rnode"):
        parameters = dict(locals())
        check_model(model)
        self._model = model
        super().__init__(forward_min_event_ndims=len(model.event_shape),
                         dtype=tf.as_dtype(model.state_dtype), validate_args=validate_args,
                         parameters=parameters, name=name)

    @classmethod
    def _parameter_properties(cls, dtype):
        return {}

    @property
    def model(self):
        return self._model

    # A value call solves afresh: an entry left by an earlier call may predate
    # new weights. Its log-det query finds the entry this call makes.
    def forward(self, x, name="forward", **kwargs):
        self._cache.clear()
        return super().forward(x, name=name, **kwargs)

    def inverse(self, y, name="inverse", **kwargs):
        self._cache.clear()
        return super().inverse(y, name=name, **kwargs)

    def _forward_and_log_det(self, z):
        flat, batch = self._rows(z, "forward")
        x, logdet = self._model.decode(unpack(flat, self._model.latent_shapes))
        logdet = tf.reshape(logdet, batch)
        return tf.reshape(x, tf.shape(z)), {"fldj": logdet, "ildj": -logdet}

    def _inverse_and_log_det(self, x):
        flat, batch = self._rows(x, "inverse")
        latents, logdet, _ = self._model.encode(flat)
        z, logdet = pack(latents), tf.reshape(logdet, batch)
        return tf.reshape(z, tf.shape(x)), {"ildj": logdet, "fldj": -logdet}

    def _forward(self, z):
        return self._forward_and_log_det(z)[0]

    def _inverse(self, x):
        return self._inverse_and_log_det(x)[0]

    def _forward_log_det_jacobian(self, z):
        return self._forward_and_log_det(z)[1]["fldj"]

    def _inverse_log_det_jacobian(self, x):
        return self._inverse_and_log_det(x)[1]["ildj"]

    def _rows(self, t, direction):
        """(*batch, *event) -> (rows (n, *event) in the model's dtype, the batch shape)."""
        event = tuple(self._model.event_shape)
        k = len(event)
        shape = tuple(t.shape)
        if len(shape) < k or any(s is not None and s != e for s, e in zip(shape[-k:], event)):
            raise ValueError(f"{self.name}.{direction} takes (*batch, *{event}), the model's "
                             f"event shape last; got shape {shape}")
        flat = tf.reshape(tf.cast(t, self._model.state_dtype), (-1, *event))
        return flat, tf.shape(t)[:len(shape) - k]


def as_distribution(model, validate_args=False, name=None):
    """A trained RNODE as a `tfp.distributions.TransformedDistribution`.

    The base is a standard normal of the model's event shape,
    `tfd.Sample(tfd.Normal(0, 1), event_shape)`, in the model's compute
    dtype; the bijector is `RNODEBijector(model)`. `log_prob(x)` on
    (*batch, *event_shape) returns log p in nats of shape batch, equal to
    `model.log_prob(x)` (for images: of the dequantized y in [0, 1)^D, not
    of the integer image); `sample(n)` returns (n, *event_shape) in the
    model's dtype, distributed as `model.sample(n)` (continuous y for
    images). See the module docstring for the multiscale latent, caching
    and Hutchinson evaluation.

    Raises TypeError or ValueError as `RNODEBijector` does; under a Keras
    backend other than TensorFlow, importing this module raises ImportError.
    """
    bijector = RNODEBijector(model, validate_args=validate_args)
    dtype = bijector.dtype
    base = tfp.distributions.Sample(tfp.distributions.Normal(tf.zeros((), dtype),
                                                             tf.ones((), dtype)),
                                    sample_shape=tuple(model.event_shape),
                                    validate_args=validate_args)
    return tfp.distributions.TransformedDistribution(base, bijector, validate_args=validate_args,
                                                     name=name or model.name)
