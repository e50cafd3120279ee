"""Time-conditioned dynamics networks f(t, z) for continuous normalizing flows.

Each network is a Keras layer called as ``net(t, z)``: ``t`` is the scalar ODE
time (or one time per sample, shape (batch,), as flow matching draws them)
and ``z`` a batch of states; the result has ``z``'s shape. The layers
follow FFJORD's time-conditioned blocks (Grathwohl et al., 2019):

- ``ConcatSquashMLP``: dense layers ``(W x + b) * sigmoid(w_g t + b_g) + w_h t``.
- ``ConcatConvNet``: 2-D convolutions that see ``t`` as an extra constant
  input channel.
- ``ConcatSquashConvNet``: 2-D convolutions gated and shifted by ``t`` like
  the dense blocks.

By default the last block's parameters start at zero, so ``f == 0`` exactly
and a fresh CNF is the identity map. The first block's kernel starts at
U(+-1/sqrt(fan_in)), as PyTorch starts its Linear and Conv2d kernels (and
so the paper's code), the others' at Glorot uniform (benchmarks/RESULTS.md,
"Learning per step").

Conditional flows: the squash nets built with ``context_dim=C`` are called
as ``net(t, z, context)`` with a per-sample context of shape (batch, C)
(a label embedding, an encoder's output), which enters every block's gate
and shift beside t, as FFJORD's conditional ConcatSquash layers take [t, c]:
``(W x + b) * sigmoid(w_g t + b_g + c U_g) + w_h t + c U_h``.
"""

import math

import keras
from keras import ops

from keras_rnode import backend, checks

PACKAGE = "keras_rnode"

# FFJORD's gate and hyper-bias are Linear(1, units) maps, whose default
# PyTorch init is U(-1, 1): enough time dependence to matter from step one.
_TIME_INIT = {"class_name": "RandomUniform", "config": {"minval": -1.0, "maxval": 1.0}}

# The first block, the one that reads the state z, starts its kernel at
# U(+-1/sqrt(fan_in)): the kernel bound of PyTorch's Linear/Conv2d, which the
# paper's code trains from (biases stay zero here). On a 2-D state Glorot's
# bound is less than half that (+-0.30 where fan_in gives +-0.71 for 2 -> 64),
# and a flow started at Glorot left its early plateau later. The deeper
# kernels keep Glorot, which learned faster than fan_in on the 64-256-256
# digits net (benchmarks/RESULTS.md, "Learning per step").
_FIRST_KERNEL_INIT = {
    "class_name": "VarianceScaling",
    "config": {"scale": 1.0 / 3.0, "mode": "fan_in", "distribution": "uniform"},
}


def validate_dynamics_output(name, z, dz, dynamics=None):
    """Raise ValueError when `dz`'s static shape is not `z`'s; return `dz`.

    Unknown (None) dimensions are taken to agree; a rank mismatch never does.
    `name` (a CNF's) and `dynamics` (the net's name) say whose output it is.
    """
    z_shape, dz_shape = checks.static_shape(z), checks.static_shape(dz)
    if not checks.shapes_agree(z_shape, dz_shape):
        which = "dynamics" if dynamics is None else f"dynamics {dynamics!r}"
        raise ValueError(
            f"{name}: {which} returned shape {dz_shape} for input of shape "
            f"{z_shape}; a dynamics function must return its input's shape"
        )
    return dz


def _activation(layer, identifier):
    """Resolve `identifier`, returning (function, config value)."""
    try:
        fn = keras.activations.get(identifier)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{layer}: unknown activation {identifier!r}") from e
    if isinstance(identifier, str):
        return fn, identifier
    return fn, keras.activations.serialize(fn)


def _time(layer, t, dtype):
    """The ODE time `t` (a Python number or a tensor) as a tensor of `dtype`: a scalar, or
    a (batch,) vector of one time per sample (flow matching draws one per sample).

    Keras takes only tensors as a layer's positional arguments, so the nets
    convert t before calling into Keras: solvers and users may pass a number.
    """
    if not (ops.is_tensor(t) or isinstance(t, keras.KerasTensor)):
        t = ops.convert_to_tensor(t, dtype=dtype)
    shape = checks.static_shape(t)
    if len(shape) > 1:
        raise ValueError(f"{layer}: t must be a scalar (the ODE time) or one time per "
                         f"sample, shape (batch,); got shape {shape}")
    t = ops.cast(t, dtype)
    return ops.reshape(t, ()) if shape in ((), (1,)) else t


def _per_sample(t, like):
    """t broadcastable against `like` (batch, ..., channels): as is when a scalar, else
    (batch, 1, ..., 1)."""
    if len(t.shape) == 0:
        return t
    return ops.reshape(t, (-1,) + (1,) * (len(like.shape) - 1))


# ---------------------------------------------------------------- blocks --
# Blocks are private: the networks rebuild them from their own config, so
# only the networks are serialized. Blocks take (x, t) so that Keras reads
# the build shape from x.


class _ConcatSquashDense(keras.layers.Layer):
    """(W x + b) * sigmoid(w_g t + b_g [+ c U_g]) + w_h t [+ c U_h], with t a scalar."""

    def __init__(self, units, zero_init=False, kernel_initializer="glorot_uniform",
                 context_dim=None, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.zero_init = zero_init
        self.kernel_initializer = kernel_initializer
        self.context_dim = context_dim

    def build(self, input_shape):
        _add_squash_weights(self, (input_shape[-1], self.units))

    def call(self, x, t, context=None):
        # backend.matmul: Keras's PyTorch matmul computes float64 in float32.
        return _squash(self, backend.matmul(x, self.kernel), t, context)


def _add_squash_weights(layer, kernel_shape):
    """The kernel and bias of `layer`, and the gate and hyper-bias that carry t."""
    n = kernel_shape[-1]
    main = "zeros" if layer.zero_init else layer.kernel_initializer
    time = "zeros" if layer.zero_init else _TIME_INIT
    # Creation order fixes the initializers' random draws and the weights' order.
    layer.kernel = layer.add_weight(shape=kernel_shape, initializer=main, name="kernel")
    layer.bias = layer.add_weight(shape=(n,), initializer="zeros", name="bias")
    layer.gate_kernel = layer.add_weight(shape=(n,), initializer=time, name="gate_kernel")
    layer.gate_bias = layer.add_weight(shape=(n,), initializer=time, name="gate_bias")
    layer.hyper_bias = layer.add_weight(shape=(n,), initializer=time, name="hyper_bias")
    if layer.context_dim:
        # PyTorch's Linear init for the context's share of the [t, c] input.
        bound = 1.0 / math.sqrt(layer.context_dim)
        context = "zeros" if layer.zero_init else keras.initializers.RandomUniform(-bound, bound)
        shape = (layer.context_dim, n)
        layer.gate_context = layer.add_weight(shape=shape, initializer=context,
                                              name="gate_context")
        layer.hyper_context = layer.add_weight(shape=shape, initializer=context,
                                               name="hyper_context")


def _squash(layer, out, t, context=None):
    """(out + b) * sigmoid(w_g t + b_g [+ c U_g]) + w_h t [+ c U_h], `out` = the kernel on x."""
    # (n,) vectors from a scalar t, broadcast against out's last axis; (batch, 1.., n)
    # from one time per sample.
    t = _per_sample(t, out)
    gate = layer.gate_kernel * t + layer.gate_bias
    shift = layer.hyper_bias * t
    if context is not None:
        # (batch, n) from the context, broadcast over any spatial axes of out.
        per_sample = (-1,) + (1,) * (len(out.shape) - 2) + (out.shape[-1],)
        gate = gate + ops.reshape(backend.matmul(context, layer.gate_context), per_sample)
        shift = shift + ops.reshape(backend.matmul(context, layer.hyper_context), per_sample)
    return (out + layer.bias) * ops.sigmoid(gate) + shift


class _ConvBlock(keras.layers.Layer):
    """A channels-last convolution block: `filters` outputs, square kernels."""

    def __init__(self, filters, kernel_size, zero_init=False,
                 kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = kernel_size
        self.zero_init = zero_init
        self.kernel_initializer = kernel_initializer


class _ConcatConv(_ConvBlock):
    """Conv over [x, t * ones] (FFJORD's ConcatConv2d), channels-last."""

    def build(self, input_shape):
        k, c = self.kernel_size, input_shape[-1]
        self.channels_in = c
        # One kernel over c + 1 inputs, the last being the time channel.
        self.kernel = self.add_weight(
            shape=(k, k, c + 1, self.filters),
            initializer="zeros" if self.zero_init else self.kernel_initializer,
            name="kernel",
        )
        self.bias = self.add_weight(shape=(self.filters,), initializer="zeros", name="bias")

    def call(self, x, t):
        c = self.channels_in
        out = ops.conv(x, self.kernel[:, :, :c, :], padding="same")
        # Convolution is linear, so the constant t channel contributes
        # t * conv(ones): one (1, H, W, filters) map shared by the batch
        # instead of a (batch, H, W, 1) channel concatenated onto x. With
        # "same" zero padding it is not constant near the border, exactly
        # as in the concatenated form.
        ones = ops.ones((1, ops.shape(x)[1], ops.shape(x)[2], 1), dtype=x.dtype)
        time_map = ops.conv(ones, self.kernel[:, :, c:, :], padding="same")
        return out + _per_sample(t, out) * time_map + self.bias


class _ConcatSquashConv(_ConvBlock):
    """conv(x) * sigmoid(w_g t + b_g [+ c U_g]) + w_h t [+ c U_h] (FFJORD's ConcatSquashConv2d)."""

    def __init__(self, filters, kernel_size, context_dim=None, **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        self.context_dim = context_dim

    def build(self, input_shape):
        k = self.kernel_size
        _add_squash_weights(self, (k, k, input_shape[-1], self.filters))

    def call(self, x, t, context=None):
        return _squash(self, ops.conv(x, self.kernel, padding="same"), t, context)


# -------------------------------------------------------------- networks --


class _DynamicsNet(keras.layers.Layer):
    """Shared plumbing: a stack of (x, t) blocks with activations between.

    Subclasses set `_rank` and implement `_make_blocks(z_shape)`; those whose
    blocks take a context set `_takes_context`.
    """

    _rank = None
    _takes_context = False

    def __init__(self, activation="softplus", zero_init_last=True, context_dim=None, **kwargs):
        super().__init__(**kwargs)
        self._activation_fn, self.activation = _activation(
            type(self).__name__, activation
        )
        self.zero_init_last = bool(zero_init_last)
        with checks.owned_by(type(self).__name__):
            if context_dim is not None:
                if not self._takes_context:
                    raise ValueError("takes no context (context_dim); the squash nets do")
                context_dim = checks.integer(context_dim, "context_dim")
        self.context_dim = context_dim
        self._z_shape = None

    def _check_rank(self, shape):
        shape = tuple(shape)
        if len(shape) != self._rank:
            what = "(batch, dim)" if self._rank == 2 else "(batch, height, width, channels)"
            raise ValueError(
                f"{type(self).__name__} '{self.name}': expected z of rank "
                f"{self._rank} {what}, got shape {shape}"
            )
        return shape

    def __call__(self, t, z, context=None, **kwargs):
        t = _time(type(self).__name__, t, self.compute_dtype)
        if (context is None) != (self.context_dim is None):
            raise ValueError(
                f"{type(self).__name__} '{self.name}': built with context_dim="
                f"{self.context_dim}, called with{'out' if context is None else ''} a context")
        if context is None:
            return super().__call__(t, z, **kwargs)
        return super().__call__(t, z, context, **kwargs)

    def build(self, t_shape=None, z_shape=None, context_shape=None):
        z_shape = self._check_rank(z_shape)
        if z_shape[-1] is None:
            raise ValueError(
                f"{type(self).__name__} '{self.name}': the last dimension of z "
                f"must be known, got shape {z_shape}"
            )
        self._z_shape = z_shape
        self.blocks = self._make_blocks(z_shape)
        shape = z_shape
        for block in self.blocks:
            block.build(shape)
            shape = shape[:-1] + (_block_width(block),)

    def call(self, t, z, context=None):
        shape = self._check_rank(checks.static_shape(z))
        if shape[-1] != self._z_shape[-1]:
            raise ValueError(
                f"{type(self).__name__} '{self.name}': built for last "
                f"dimension {self._z_shape[-1]}, got z of shape {shape}"
            )
        if len(t.shape) == 1 and not checks.shapes_agree(checks.static_shape(t), shape[:1]):
            raise ValueError(f"{type(self).__name__} '{self.name}': one time per sample must "
                             f"be (batch,) for z of shape {shape}, got shape "
                             f"{checks.static_shape(t)}")
        extra = ()
        if context is not None:
            extra = (self._checked_context(context, shape),)
        h = z
        for i, block in enumerate(self.blocks):
            h = block(h, t, *extra)
            if i < len(self.blocks) - 1:
                h = self._activation_fn(h)
        return h

    def _checked_context(self, context, z_shape):
        context = ops.cast(context, self.compute_dtype)
        shape = checks.static_shape(context)
        if not checks.shapes_agree(shape, (z_shape[0], self.context_dim)):
            raise ValueError(
                f"{type(self).__name__} '{self.name}': the context must be (batch, "
                f"{self.context_dim}) for z of shape {z_shape}, got shape {shape}")
        return context

    def compute_output_shape(self, t_shape=None, z_shape=None, context_shape=None):
        return z_shape

    # The default build config maps a lone shape to the first call
    # argument (t); record z's shape by name instead. Weights depend only on
    # the last dimension, so the batch size is not pinned.
    def get_build_config(self):
        if self._z_shape is None:
            return None
        return {"z_shape": [None] + list(self._z_shape[1:])}

    def build_from_config(self, config):
        if config and "z_shape" in config:
            self.build(z_shape=tuple(config["z_shape"]))

    def get_config(self):
        config = super().get_config()
        config.update(activation=self.activation, zero_init_last=self.zero_init_last)
        if self.context_dim is not None:
            config["context_dim"] = self.context_dim
        return config


def _block_width(block):
    return block.units if hasattr(block, "units") else block.filters


def _stack(net, block, widths, name, **kwargs):
    """Blocks of `widths` named name_0, name_1, ...; the last zeroed if `net` says so.

    The first block's kernel starts at _FIRST_KERNEL_INIT, the others' at Glorot.
    """
    last = len(widths) - 1
    if net.context_dim is not None:
        kwargs["context_dim"] = net.context_dim
    return [
        block(n, zero_init=net.zero_init_last and i == last,
              kernel_initializer=_FIRST_KERNEL_INIT if i == 0 else "glorot_uniform",
              dtype=net.dtype_policy,
              name=f"{name}_{i}", **kwargs)
        for i, n in enumerate(widths)
    ]


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConcatSquashMLP(_DynamicsNet):
    """FFJORD's ConcatSquash MLP on flat states z of shape (batch, dim).

    Args:
        hidden: widths of the hidden layers; the last layer maps back to dim.
        activation: Keras activation between layers (none after the last).
        zero_init_last: zero the last layer's parameters so f == 0 at init.
        context_dim: width C of a per-sample context (batch, C): the net is
            then called as net(t, z, context) (see the module docstring).
    """

    _rank = 2
    _takes_context = True

    def __init__(self, hidden=(64, 64, 64), activation="softplus", zero_init_last=True,
                 context_dim=None, **kwargs):
        super().__init__(activation=activation, zero_init_last=zero_init_last,
                         context_dim=context_dim, **kwargs)
        with checks.owned_by(type(self).__name__):
            self.hidden = checks.positive_ints(hidden, "hidden")

    def _make_blocks(self, z_shape):
        return _stack(self, _ConcatSquashDense, self.hidden + (z_shape[-1],), "concat_squash")

    def get_config(self):
        config = super().get_config()
        config["hidden"] = list(self.hidden)
        return config


class _ConvNet(_DynamicsNet):
    """Channels-last conv nets: 'same' padding, stride 1, output channels = C.

    Args:
        channels: output channels of the hidden convolutions.
        activation: Keras activation between convolutions.
        kernel_size: square kernel size (FFJORD uses 3).
        zero_init_last: zero the last block's parameters so f == 0 at init.
    """

    _rank = 4
    _block = None

    def __init__(
        self,
        channels=(64, 64, 64),
        activation="softplus",
        kernel_size=3,
        zero_init_last=True,
        **kwargs,
    ):
        super().__init__(activation=activation, zero_init_last=zero_init_last, **kwargs)
        with checks.owned_by(type(self).__name__):
            self.channels = checks.positive_ints(channels, "channels")
            self.kernel_size = checks.integer(kernel_size, "kernel_size")

    def _make_blocks(self, z_shape):
        return _stack(self, self._block, self.channels + (z_shape[-1],), self._block_name,
                      kernel_size=self.kernel_size)

    def get_config(self):
        config = super().get_config()
        config.update(channels=list(self.channels), kernel_size=self.kernel_size)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConcatConvNet(_ConvNet):
    """Conv net whose every convolution sees t as an extra input channel.

    Args: channels, activation, kernel_size, zero_init_last (see `_ConvNet`).
    """

    _block = _ConcatConv
    _block_name = "concat_conv"


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConcatSquashConvNet(_ConvNet):
    """Conv net of gated convolutions: conv(x) * sigmoid(gate(t)) + hyperbias(t).

    Args: channels, activation, kernel_size, zero_init_last (see `_ConvNet`),
    and context_dim: width C of a per-sample context (batch, C); the net is
    then called as net(t, z, context).
    """

    _takes_context = True
    _block = _ConcatSquashConv
    _block_name = "concat_squash_conv"


@keras.saving.register_keras_serializable(package=PACKAGE)
class Flattened(keras.layers.Layer):
    """Dense dynamics for events of any shape: flat in, `net` (e.g. ConcatSquashMLP), reshaped out.

    `Flattened(ConcatSquashMLP(hidden=(256, 256)))` on (batch, H, W, C)
    images calls the net on (batch, H * W * C) and returns the image shape:
    for small images (scikit-learn's 8x8 digits) a dense net learns far
    faster per second than convolutions (benchmarks/RESULTS.md, "Digits").
    A context, if the net takes one, passes through.
    """

    def __init__(self, net, **kwargs):
        super().__init__(**kwargs)
        self.net = net

    @property
    def context_dim(self):
        return getattr(self.net, "context_dim", None)

    def __call__(self, t, z, context=None, **kwargs):
        t = _time(type(self).__name__, t, self.compute_dtype)
        if context is None:
            return super().__call__(t, z, **kwargs)
        return super().__call__(t, z, context, **kwargs)

    def build(self, t_shape=None, z_shape=None, context_shape=None):
        self._event_shape = tuple(z_shape[1:])
        if not self.net.built:  # a deserialized net arrives built
            self.net.build(z_shape=(None, math.prod(self._event_shape)))

    def call(self, t, z, context=None):
        flat = ops.reshape(z, (-1, math.prod(self._event_shape)))
        out = self.net(t, flat) if context is None else self.net(t, flat, context)
        return ops.reshape(out, ops.shape(z))

    def compute_output_shape(self, t_shape=None, z_shape=None, context_shape=None):
        return z_shape

    def get_build_config(self):
        return {"z_shape": [None, *self._event_shape]} if self.built else None

    def build_from_config(self, config):
        if config and "z_shape" in config:
            self.build(z_shape=tuple(config["z_shape"]))

    def get_config(self):
        config = super().get_config()
        config["net"] = keras.saving.serialize_keras_object(self.net)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["net"] = keras.saving.deserialize_keras_object(config["net"])
        return cls(**config)
