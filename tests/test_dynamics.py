"""Dynamics networks: shapes, identity init, time dependence, saving, autodiff."""

import numpy as np
import pytest
import keras
import tensorflow as tf
from keras import ops

from keras_rnode.layers.dynamics import (
    ConcatConvNet,
    ConcatSquashConvNet,
    ConcatSquashMLP,
    validate_dynamics_output,
)

# Small on purpose: the suite shares two cores.
SHAPES = {
    ConcatSquashMLP: (5, 3),
    ConcatConvNet: (2, 4, 5, 2),
    ConcatSquashConvNet: (2, 4, 5, 2),
}
WIDTHS = {ConcatSquashMLP: "hidden", ConcatConvNet: "channels", ConcatSquashConvNet: "channels"}
NETS = list(SHAPES)


def make(cls, **kwargs):
    kwargs.setdefault(WIDTHS[cls], (6, 4))
    return cls(**kwargs)


def sample(cls, dtype="float32", seed=0):
    return np.random.default_rng(seed).normal(size=SHAPES[cls]).astype(dtype)


@keras.saving.register_keras_serializable(package="keras_rnode_tests")
class _Wrapper(keras.Model):
    """A model holding a dynamics net at a fixed time."""

    def __init__(self, net, t=0.3, **kwargs):
        super().__init__(**kwargs)
        self.net, self.t = net, t

    def call(self, z):
        return self.net(self.t, z)

    def get_config(self):
        return {**super().get_config(), "net": keras.saving.serialize_keras_object(self.net), "t": self.t}

    @classmethod
    def from_config(cls, config):
        config["net"] = keras.saving.deserialize_keras_object(config["net"])
        return cls(**config)


@pytest.mark.parametrize("cls", NETS)
def test_shape_and_identity_at_init(cls):
    z = sample(cls)
    out = make(cls)(0.5, z)
    assert tuple(out.shape) == z.shape
    # Zero-initialised last layer: f == 0 exactly, so a fresh CNF is the identity.
    assert np.all(ops.convert_to_numpy(out) == 0.0)
    out = make(cls, zero_init_last=False)(0.5, z)
    assert np.abs(ops.convert_to_numpy(out)).max() > 1e-3


@pytest.mark.backends
@pytest.mark.parametrize("cls", NETS)
def test_first_kernel_starts_at_pytorch_scale(cls):
    # The block reading z starts U(+-1/sqrt(fan_in)) as the paper's PyTorch code
    # does (issue 17), std 1/sqrt(3 fan_in); the deeper ones Glorot, std
    # sqrt(2 / (fan_in + fan_out)); the last at zero. At these shapes either
    # rule's std is 1.6x to 3x the other's, so a swapped rule fails.
    net = make(cls, **{WIDTHS[cls]: (64, 64)})
    net(0.5, sample(cls))
    kernels = [ops.convert_to_numpy(w) for w in net.weights if w.path.endswith("/kernel")]
    for i, value in enumerate(kernels[:-1]):
        receptive = value[..., 0, 0].size
        fan_in, fan_out = value.size // value.shape[-1], receptive * value.shape[-1]
        std = 1 / np.sqrt(3 * fan_in) if i == 0 else np.sqrt(2 / (fan_in + fan_out))
        assert np.abs(value).max() <= np.sqrt(3) * std
        np.testing.assert_allclose(value.std(), std, rtol=0.1)
    assert not np.any(kernels[-1])


@pytest.mark.parametrize("cls", NETS)
def test_time_dependence(cls):
    net, z = make(cls, zero_init_last=False), sample(cls)
    f0, f1 = (ops.convert_to_numpy(net(t, z)) for t in (0.0, 1.0))
    assert np.abs(f0 - f1).max() > 1e-3
    # Tensor times of shape () and (1,) are accepted alike.
    np.testing.assert_array_equal(ops.convert_to_numpy(net(tf.constant([1.0]), z)), f1)


def test_concat_squash_mlp_formula():
    net, z, t = ConcatSquashMLP(hidden=(4,), activation="tanh", zero_init_last=False), sample(ConcatSquashMLP), 0.7
    out = ops.convert_to_numpy(net(t, z))
    h = z
    for i, block in enumerate(net.blocks):
        w, b, wg, bg, wh = (ops.convert_to_numpy(v) for v in block.weights)
        h = (h @ w + b) / (1 + np.exp(-(wg * t + bg))) + wh * t
        h = np.tanh(h) if i == 0 else h
    np.testing.assert_allclose(out, h, rtol=1e-5, atol=1e-6)


def test_concat_conv_matches_concatenated_time_channel():
    # The layer folds the t channel into t * conv(ones); FFJORD concatenates it.
    net, z, t = ConcatConvNet(channels=(), zero_init_last=False), sample(ConcatConvNet), 0.7
    out = ops.convert_to_numpy(net(t, z))
    (block,) = net.blocks
    tt = np.full(z.shape[:-1] + (1,), t, dtype=z.dtype)
    ref = ops.conv(np.concatenate([z, tt], -1), block.kernel, padding="same") + block.bias
    np.testing.assert_allclose(out, ops.convert_to_numpy(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", NETS)
def test_save_load_round_trip(cls, tmp_path):
    z = sample(cls)
    model = _Wrapper(make(cls, activation="swish", zero_init_last=False))
    expected = ops.convert_to_numpy(model(z))
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.net) is cls
    np.testing.assert_array_equal(ops.convert_to_numpy(loaded(z)), expected)


@pytest.mark.parametrize("cls", NETS)
def test_config_round_trip(cls):
    net = make(cls, activation="elu", zero_init_last=False, name="f")
    z = sample(cls)
    expected = ops.convert_to_numpy(net(0.2, z))
    config = net.get_config()
    keys = {"hidden"} if cls is ConcatSquashMLP else {"channels", "kernel_size"}
    assert keys | {"activation", "zero_init_last", "name", "dtype"} <= set(config)
    clone = cls.from_config(config)
    assert clone.get_config() == config
    clone.build(z_shape=z.shape)
    clone.set_weights(net.get_weights())
    np.testing.assert_array_equal(ops.convert_to_numpy(clone(0.2, z)), expected)


@pytest.mark.parametrize(
    "cls, shape",
    [(ConcatSquashMLP, (2, 3, 4)), (ConcatConvNet, (2, 3)), (ConcatSquashConvNet, (2, 4, 4))],
)
def test_wrong_rank(cls, shape):
    with pytest.raises(ValueError, match=rf"{cls.__name__}.*{shape}".replace("(", r"\(").replace(")", r"\)")):
        make(cls)(0.0, np.zeros(shape, "float32"))


def test_wrong_last_dim_after_build():
    net = ConcatSquashMLP(hidden=(4,))
    net(0.0, np.zeros((2, 3), "float32"))
    with pytest.raises(ValueError, match="ConcatSquashMLP.*last dimension 3"):
        net(0.0, np.zeros((2, 5), "float32"))


@pytest.mark.parametrize("cls", NETS)
def test_bad_arguments(cls):
    with pytest.raises(ValueError, match=f"{cls.__name__}: unknown activation 'nope'"):
        make(cls, activation="nope")
    for widths in [(0,), (4, -1), (2.5,), (True,), 8]:
        with pytest.raises(ValueError, match=f"{cls.__name__}.*positive ints"):
            make(cls, **{WIDTHS[cls]: widths})


def test_bad_kernel_size_and_time():
    with pytest.raises(ValueError, match="ConcatConvNet.*kernel_size"):
        ConcatConvNet(kernel_size=0)
    with pytest.raises(ValueError, match="t must be a scalar"):
        make(ConcatSquashMLP)(tf.zeros((5, 1)), sample(ConcatSquashMLP))
    with pytest.raises(ValueError, match=r"one time per sample must be \(batch,\)"):
        make(ConcatSquashMLP)(tf.zeros((4,)), sample(ConcatSquashMLP))


@pytest.mark.backends
@pytest.mark.parametrize("cls", NETS)
@pytest.mark.parametrize("context", [False, True])
def test_one_time_per_sample_equals_each_row_at_its_own_time(cls, context):
    if context and cls is ConcatConvNet:
        pytest.skip("ConcatConvNet takes no context")
    options = {"context_dim": 3} if context else {}
    net = make(cls, zero_init_last=False, **options)
    z = sample(cls)
    n = len(z)
    extra = (np.random.default_rng(1).normal(size=(n, 3)).astype("float32"),) if context \
        else ()
    t = np.linspace(0.1, 0.9, n).astype("float32")
    together = ops.convert_to_numpy(net(ops.convert_to_tensor(t), z, *extra))
    for i in range(n):
        alone = ops.convert_to_numpy(net(float(t[i]), z[i:i + 1], *(e[i:i + 1] for e in extra)))
        np.testing.assert_allclose(together[i:i + 1], alone, rtol=1e-5, atol=1e-6)
    # Each row really sees its own time.
    same = ops.convert_to_numpy(net(float(t[0]), z, *extra))
    assert np.abs(same[1:] - together[1:]).max() > 1e-4


def test_validate_dynamics_output():
    z = tf.zeros((4, 3))
    assert validate_dynamics_output("cnf", z, z) is z
    with pytest.raises(
        ValueError,
        match=r"^cnf: dynamics returned shape \(4, 2\) for input of shape \(4, 3\); "
        r"a dynamics function must return its input's shape$",
    ):
        validate_dynamics_output("cnf", z, tf.zeros((4, 2)))
    with pytest.raises(ValueError, match="cnf"):
        validate_dynamics_output("cnf", z, tf.zeros((4, 3, 1)))


@pytest.mark.parametrize("cls", NETS)
def test_float64_jvp_matches_finite_differences(cls):
    net = make(cls, activation="softplus", zero_init_last=False, dtype="float64")
    z, v = sample(cls, "float64", seed=1), sample(cls, "float64", seed=2)
    t = 0.4
    out, jv = ops.jvp(lambda x: net(t, x), (ops.convert_to_tensor(z),), (ops.convert_to_tensor(v),))
    assert out.dtype == jv.dtype == tf.float64
    assert all(w.dtype == "float64" for w in net.weights)
    h = 1e-6
    fd = (ops.convert_to_numpy(net(t, z + h * v)) - ops.convert_to_numpy(net(t, z - h * v))) / (2 * h)
    np.testing.assert_allclose(ops.convert_to_numpy(jv), fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("cls", NETS)
def test_gradients_reach_every_weight(cls):
    net, z = make(cls), tf.constant(sample(cls))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(net(tf.constant(0.5), z) * z)
    grads = tape.gradient(loss, net.trainable_variables)
    assert all(g is not None for g in grads)
    # The zeroed last kernel must still learn, or the flow stays the identity.
    grad = dict(zip((v.path for v in net.trainable_variables), grads))[net.blocks[-1].kernel.path]
    assert np.abs(ops.convert_to_numpy(grad)).max() > 0


@pytest.mark.parametrize("cls", NETS)
def test_xla_forward_mode(cls):
    net, z, v = make(cls, zero_init_last=False), sample(cls), sample(cls, seed=3)
    eager_out, eager_jv = ops.jvp(lambda x: net(0.6, x), (ops.convert_to_tensor(z),), (ops.convert_to_tensor(v),))

    @tf.function(jit_compile=True)
    def step(t, x, u):
        return ops.jvp(lambda y: net(t, y), (x,), (u,))

    out, jv = step(tf.constant(0.6), tf.constant(z), tf.constant(v))
    np.testing.assert_allclose(ops.convert_to_numpy(out), ops.convert_to_numpy(eager_out), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ops.convert_to_numpy(jv), ops.convert_to_numpy(eager_jv), rtol=1e-5, atol=1e-6)
