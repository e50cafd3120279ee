"""The CNF layer against closed forms, independent references and itself.

- Linear dynamics f = A z: z(T) = expm(AT) x, delta_logp = -T tr(A), the
  model density is the Gaussian N(0, expm(-AT) expm(-AT)^T), the kinetic
  integral is a 1-D quadrature, the Jacobian integral is T ||A||_F^2 / D
  (exactly with the exact trace, per probe and in expectation with
  Hutchinson).
- Hutchinson is unbiased for a nonlinear net: `divergence.hutchinson`
  over many probes and the CNF's Hutchinson delta_logp / Jacobian states
  over a batch of identical rows match the exact values within 4 standard
  errors, for Gaussian and Rademacher probes.
- One noise draw per solve, shared by every evaluation; fresh noise for
  the next solve; reproducible from the seed.
- inverse(forward(x)) == x; a 2-D flow's density integrates to 1 on a
  grid; log p agrees with tfp.bijectors.FFJORD (TensorFlow only).

Runs under every Keras backend.
- Weight and input gradients (adjoint and direct) against float64
  finite differences with frozen noise; the same numbers under
  every compiled mode of the backend (tf.function with and without XLA,
  jax.jit).
- Training vs evaluation solvers, regularizer states, serialization and
  bad input.
"""

import math

import keras
import numpy as np
import pytest
from keras import ops
from scipy import integrate, stats
from scipy.linalg import expm

import keras_rnode as kr
from keras_rnode.backend import REPORTS_BACKWARD
from keras_rnode.layers import CNF, ConcatSquashMLP, divergence
from tests.backend_utils import BACKEND, MODES, compiled, f64, gradients, np_, tf_only

pytestmark = pytest.mark.backends

NOISES = ("gaussian", "rademacher")
LOG_2PI = math.log(2.0 * math.pi)


def log_normal(z):
    z = np.asarray(z)
    return -0.5 * np.sum(z**2, axis=1) - 0.5 * z.shape[1] * LOG_2PI


def rnode_states(out):
    """(z, delta_logp, kinetic, jacobian) of a FlowOutput asked for RNODE's two penalties."""
    return out.z, out.delta_logp, out.penalties["kinetic"], out.penalties["jacobian"]


def frobenius(products):
    """||J||_F^2 / D from the trace estimator's (k, batch, D) products."""
    products = np.asarray(products)
    return np.sum(products**2, axis=(0, 2)) / products.shape[-1]


def stats_of(cnf):
    return {k: int(np_(v)) for k, v in cnf.stats.items()}


def assert_unbiased(samples, expected, k=4.0, what=""):
    """mean(samples) within k standard errors of `expected`, per column."""
    samples = np.asarray(samples)
    mean = samples.mean(axis=0)
    se = samples.std(axis=0, ddof=1) / math.sqrt(samples.shape[0])
    assert np.all(np.abs(mean - expected) <= k * se), (
        f"{what}: mean {mean} vs expected {expected}, {k} SE = {k * se}")
    return mean, se


class Linear(keras.layers.Layer):
    """f(t, z) = A z for a fixed matrix A (rows of z are samples)."""

    def __init__(self, a, **kwargs):
        super().__init__(dtype="float64", **kwargs)
        self.a = np.asarray(a, "float64")

    def call(self, t, z):
        # The package's matmul: Keras's PyTorch ops.matmul computes float64 in float32.
        return kr.backend.matmul(z, ops.convert_to_tensor(self.a.T, z.dtype))


def make_net(dim, hidden=(8, 8), seed=0, scale=1.0, dtype="float64"):
    """A ConcatSquashMLP with a random (non-zero) last layer, kernels times `scale`.

    The weights are drawn with NumPy (Glorot-uniform kernels, zero biases,
    U(-1, 1) time maps), so every Keras backend gets the same net.
    """
    net = ConcatSquashMLP(hidden=hidden, activation="softplus", zero_init_last=False,
                          dtype=dtype)
    net(0.0, np.zeros((1, dim), dtype))
    rng = np.random.default_rng(seed)
    for v in net.weights:
        name = v.path.rsplit("/", 1)[-1]
        if name == "kernel":
            limit = math.sqrt(6.0 / sum(v.shape))
            value = scale * rng.uniform(-limit, limit, v.shape)
        elif name == "bias":
            value = np.zeros(v.shape)
        else:
            value = rng.uniform(-1.0, 1.0, v.shape)
        v.assign(value.astype(dtype))
    return net


def compiled_layer_fn(layer, fn, mode):
    """fn(x), calling `layer`, compiled per mode.

    A jitted JAX function must not write Keras variables from inside: there
    the layer's state goes in and comes back out (the package's own
    inference wrapper does exactly that).
    """
    if BACKEND == "jax" and mode == "jit":
        from keras_rnode.backend import jax as jax_backend

        return jax_backend.inference_function(layer, fn)
    return compiled(fn, mode)


# --------------------------------------------------------------------------
# Linear dynamics: closed forms.

A3 = np.array([[-0.4, 0.7, 0.1],
               [-0.3, -0.2, -0.5],
               [0.6, 0.1, -0.3]])  # tr = -0.9, not symmetric
T_LIN = 1.3


def kinetic_closed_form(a, x, big_t):
    """0.5 * mean over dims of |A expm(At) x|^2, integrated over [0, T]."""

    def integrand(t, xi):
        f = a @ expm(a * t) @ xi
        return 0.5 * np.mean(f**2)

    return np.array([integrate.quad(integrand, 0.0, big_t, args=(xi,), epsabs=1e-13,
                                    epsrel=1e-13)[0] for xi in x])


def test_linear_flow_exact_trace_matches_closed_forms():
    x = np.random.default_rng(0).normal(size=(4, 3))
    cnf = CNF(Linear(A3), trace="exact", rtol=1e-9, atol=1e-9, T=T_LIN, dtype="float64")
    z, dlogp, kinetic, jac = (np_(v) for v in rnode_states(cnf(x, training=True, regularize=True)))
    assert stats_of(cnf)["status"] == kr.Status.SUCCESS

    np.testing.assert_allclose(z, x @ expm(A3 * T_LIN).T, rtol=1e-8, atol=1e-9)
    # d/dt delta_logp = -tr(A), a constant.
    np.testing.assert_allclose(dlogp, np.full(4, -T_LIN * np.trace(A3)), rtol=0, atol=1e-12)
    # Change of variables: log p(x) = log N(expm(AT) x) + T tr(A), i.e. the
    # Gaussian N(0, Sigma) with Sigma = expm(-AT) expm(-AT)^T.
    inv = expm(-A3 * T_LIN)
    sigma = inv @ inv.T
    expected = stats.multivariate_normal(np.zeros(3), sigma).logpdf(x)
    np.testing.assert_allclose(log_normal(z) - dlogp, expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(kinetic, kinetic_closed_form(A3, x, T_LIN), rtol=1e-8)
    np.testing.assert_allclose(jac, np.full(4, T_LIN * np.sum(A3**2) / 3), rtol=1e-12)


@pytest.mark.parametrize("noise", NOISES)
def test_linear_flow_hutchinson_per_probe_and_in_expectation(noise, monkeypatch):
    n = 10000
    x = np.random.default_rng(1).normal(size=(n, 3))
    cnf = CNF(Linear(A3), trace="hutchinson", noise=noise, rtol=1e-8, atol=1e-8,
              T=T_LIN, seed=3, dtype="float64")
    drawn = []
    draw = cnf._noise
    monkeypatch.setattr(cnf, "_noise", lambda x_: drawn.append(draw(x_)) or drawn[-1])
    z, dlogp, kinetic, jac = (np_(v) for v in rnode_states(cnf(x, training=True, regularize=True)))
    assert len(drawn) == 1
    eps = np_(drawn[0])
    if noise == "rademacher":
        assert set(np.unique(eps)) == {-1.0, 1.0}

    # The flow itself does not depend on the probe.
    np.testing.assert_allclose(z, x @ expm(A3 * T_LIN).T, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(kinetic[:5], kinetic_closed_form(A3, x[:5], T_LIN), rtol=1e-7)
    # Per probe: delta_logp = -T eps^T A eps exactly. The Jacobian state is
    # T |J eps|^2 / D (DESIGN, forward mode) or T |eps^T J|^2 / D (the TF
    # backend's reverse-mode product); both estimate ||A||_F^2 / D.
    np.testing.assert_allclose(dlogp, -T_LIN * np.einsum("bi,ij,bj->b", eps, A3, eps),
                               rtol=1e-7, atol=1e-8)
    forward_mode = T_LIN * np.mean((eps @ A3.T) ** 2, axis=1)
    reverse_mode = T_LIN * np.mean((eps @ A3) ** 2, axis=1)
    assert (np.allclose(jac, forward_mode, rtol=1e-7, atol=1e-9)
            or np.allclose(jac, reverse_mode, rtol=1e-7, atol=1e-9))
    # In expectation: the exact values, within 4 standard errors.
    _, se_tr = assert_unbiased(dlogp, -T_LIN * np.trace(A3), what="trace")
    _, se_fr = assert_unbiased(jac, T_LIN * np.sum(A3**2) / 3, what="frobenius")
    # The test has power: 4 SE is a small fraction of the value.
    assert se_tr < 0.03 * T_LIN * abs(np.trace(A3)) and se_fr < 0.03 * np.sum(A3**2) / 3


# --------------------------------------------------------------------------
# Hutchinson is unbiased for a nonlinear net.


@pytest.mark.parametrize("noise", NOISES)
def test_hutchinson_estimator_is_unbiased(noise):
    dim, reps = 3, 20000
    net = make_net(dim, hidden=(16, 16), seed=2, scale=3.0)
    rng = np.random.default_rng(3)
    points = rng.normal(size=(3, dim))
    t = f64(0.4)
    fn = lambda z_: net(t, z_)  # noqa: E731

    # Exact values, checked against the full Jacobian.
    _, tr_exact, fr_exact = (np_(v) for v in divergence.exact(fn, f64(points)))
    fr_exact = frobenius(fr_exact)
    # The full Jacobian by reverse mode, one output component at a time (rows
    # are independent samples, so d sum_b f_b[i] / dz_b is row b's J[i, :]).
    jac = np.stack([np_(gradients(lambda z_, i=i: ops.sum(fn(z_)[:, i]), [f64(points)])[1][0])
                    for i in range(dim)], axis=1)
    np.testing.assert_allclose(tr_exact, np.trace(jac, axis1=1, axis2=2), rtol=1e-12)
    np.testing.assert_allclose(fr_exact, np.sum(jac**2, axis=(1, 2)) / dim, rtol=1e-12)
    frobenius_norm = np.sqrt(dim * fr_exact)  # ||J||_F, the scale of the trace noise
    assert np.all(frobenius_norm > 0.5)

    z = np.repeat(points, reps, axis=0)
    if noise == "gaussian":
        eps = rng.normal(size=z.shape)
    else:
        eps = rng.choice([-1.0, 1.0], size=z.shape)
    f_h, tr_h, fr_h = (np_(v) for v in divergence.hutchinson(fn, f64(z), f64(eps)))
    fr_h = frobenius(fr_h)
    np.testing.assert_allclose(f_h, np_(fn(f64(z))), rtol=1e-14, atol=1e-14)
    tr_h, fr_h = tr_h.reshape(3, reps).T, fr_h.reshape(3, reps).T
    _, se = assert_unbiased(tr_h, tr_exact, what=f"trace ({noise})")
    assert np.all(se < 0.015 * frobenius_norm)  # the test has power
    _, se = assert_unbiased(fr_h, fr_exact, what=f"frobenius ({noise})")
    assert np.all(se < 0.02 * fr_exact)


@pytest.mark.parametrize("noise", NOISES)
def test_cnf_hutchinson_matches_exact_in_expectation(noise):
    # A batch of identical rows: one path, a different probe per row.
    dim, n = 2, 4000
    net = make_net(dim, hidden=(16, 16), seed=13, scale=3.0)
    x = np.repeat(np.array([[1.0, 0.5]]), n, axis=0)
    kw = dict(rtol=1e-6, atol=1e-6, dtype="float64")
    exact = CNF(net, trace="exact", **kw)
    hutch = CNF(net, trace="hutchinson", noise=noise, seed=5, **kw)
    z_e, dl_e, k_e, j_e = (np_(v) for v in rnode_states(exact(x[:1], training=True,
                                                               regularize=True)))
    z_h, dl_h, k_h, j_h = (np_(v) for v in rnode_states(hutch(x, training=True,
                                                              regularize=True)))
    # The path does not depend on the probes (up to the solver's tolerance).
    np.testing.assert_allclose(z_h, np.repeat(z_e, n, axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(k_h, np.repeat(k_e, n), rtol=1e-4)
    assert abs(dl_e[0]) > 0.5 and j_e[0] > 0.5
    _, se = assert_unbiased(dl_h, dl_e[0], what=f"delta_logp ({noise})")
    assert se < 0.03 * abs(dl_e[0])  # the test has power
    _, se = assert_unbiased(j_h, j_e[0], what=f"jacobian ({noise})")
    assert se < 0.03 * j_e[0]


# --------------------------------------------------------------------------
# Noise: once per solve, fresh per solve, reproducible from the seed.


def test_noise_is_drawn_once_per_solve_and_fixed_within_it(monkeypatch):
    net = make_net(2, hidden=(4,), seed=6)
    cnf = CNF(net, trace="hutchinson", rtol=1e-6, atol=1e-6, seed=7, dtype="float64")
    x = np.random.default_rng(2).normal(size=(3, 2))

    draws, probes = [], []
    draw, estimate = cnf._noise, divergence.hutchinson
    monkeypatch.setattr(cnf, "_noise", lambda x_: draws.append(draw(x_)) or draws[-1])

    def recording(fn, z, eps):
        if BACKEND == "jax":
            # The solver's loop body is traced once: record each evaluation's
            # probe as it runs.
            import jax

            jax.debug.callback(lambda e: probes.append(np.asarray(e)), eps)
        else:
            probes.append(np_(eps))
        return estimate(fn, z, eps)

    monkeypatch.setattr(divergence, "hutchinson", recording)

    results = []
    for solve in range(2):
        _, dlogp, _ = cnf(x, training=True)
        results.append(np_(dlogp))
        assert len(draws) == solve + 1
        nfe = stats_of(cnf)["nfe"]
        # PyTorch evaluates the dynamics once more, untimed, at t0 to find the
        # weights the solve's gradient needs (backend.torch._parameters).
        discovery = 1 if BACKEND == "torch" else 0
        assert len(probes) == nfe + discovery and nfe > 6
        eps = np_(draws[-1])
        for p in probes:  # every stage of every step, the initial-step probes too
            np.testing.assert_array_equal(p, eps)
        assert np.all(np.abs(eps[0] - eps[1]) > 0)  # per sample
        probes.clear()
    assert not np.allclose(np_(draws[0]), np_(draws[1]))
    assert np.all(np.abs(results[0] - results[1]) > 1e-6)


def test_same_seed_same_noise():
    net = make_net(2, hidden=(4,), seed=6)
    x = np.random.default_rng(2).normal(size=(3, 2))

    def first_solve(seed):
        cnf = CNF(net, trace="hutchinson", rtol=1e-6, atol=1e-6, seed=seed, dtype="float64")
        return np_(cnf(x, training=True)[1])

    np.testing.assert_array_equal(first_solve(11), first_solve(11))
    assert np.all(np.abs(first_solve(11) - first_solve(12)) > 1e-6)


# --------------------------------------------------------------------------
# Round trip, normalization, and tfp's FFJORD.


def test_inverse_round_trip():
    net = make_net(2, seed=0, scale=3.0)
    x = np.random.default_rng(4).normal(size=(5, 2))
    cnf = CNF(net, trace="exact", rtol=1e-8, atol=1e-8, dtype="float64")
    z, dlogp = (np_(v) for v in cnf(x)[:2])
    assert np.abs(z - x).max() > 1.0 and np.abs(dlogp).min() > 0.2  # a real flow
    x_back, dlogp_back = (np_(v) for v in cnf.inverse(z)[:2])
    np.testing.assert_allclose(x_back, x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dlogp_back, dlogp, rtol=1e-6, atol=1e-6)


def test_density_integrates_to_one():
    net = make_net(2, hidden=(16, 16), seed=9, scale=2.0)
    cnf = CNF(net, trace="exact", eval_method="dopri5", rtol=1e-6, atol=1e-6,
              dtype="float64")
    n, half = 100, 6.0
    edges = np.linspace(-half, half, n + 1)
    mid = 0.5 * (edges[1:] + edges[:-1])
    grid = np.stack(np.meshgrid(mid, mid, indexing="ij"), -1).reshape(-1, 2)

    def log_prob(x_):
        z, dlogp, _ = cnf(x_)
        return -0.5 * ops.sum(z**2, axis=1) - LOG_2PI - dlogp

    log_prob = compiled_layer_fn(cnf, log_prob, "graph" if BACKEND == "tensorflow"
                                 else MODES[-1])
    logp = np.concatenate([np_(log_prob(f64(b))) for b in np.split(grid, 4)])
    mass = np.exp(logp).sum() * (edges[1] - edges[0]) ** 2
    assert abs(mass - 1.0) < 0.01, mass
    # Not the base density: the flow moves mass around.
    assert np.abs(logp - log_normal(grid)).max() > 0.5


@tf_only  # tfp's FFJORD bijector is TensorFlow's
def test_log_prob_matches_tfp_ffjord():
    import tensorflow as tf

    tfp = pytest.importorskip("tensorflow_probability")
    tfb, tfd = tfp.bijectors, tfp.distributions
    net = make_net(2, seed=10, scale=2.5)
    big_t, tol = 1.0, 1e-8
    x = np.random.default_rng(5).normal(size=(6, 2))
    cnf = CNF(net, trace="exact", rtol=tol, atol=tol, T=big_t, dtype="float64")
    z, dlogp = (np_(v) for v in cnf(x)[:2])
    ours = log_normal(z) - dlogp

    # tfp's FFJORD maps base -> data forward and data -> base by solving
    # -g(final - s, y) from initial (0) to final (T). Our data -> noise map
    # solves f(s, y) over [0, T], so g(t, y) = -f(T - t, y).
    ffjord = tfb.FFJORD(
        state_time_derivative_fn=lambda t, y: -net(big_t - t, y),
        ode_solve_fn=tfp.math.ode.DormandPrince(rtol=tol, atol=tol).solve,
        trace_augmentation_fn=tfb.ffjord.trace_jacobian_exact,
        initial_time=0.0, final_time=big_t, dtype=tf.float64)
    base = tfd.MultivariateNormalDiag(loc=f64(np.zeros(2)))
    flow = tfd.TransformedDistribution(distribution=base, bijector=ffjord)
    theirs, z_theirs = (np_(v) for v in tf.function(
        lambda x_: (flow.log_prob(x_), ffjord.inverse(x_)))(f64(x)))
    np.testing.assert_allclose(z_theirs, z, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    assert np.abs(ours - log_normal(x)).max() > 0.1


# --------------------------------------------------------------------------
# Gradients with frozen noise: adjoint and direct against finite differences.


def _frozen_problem(gradients, tol):
    """A net, CNF layers sharing it (one per gradient method) and x; frozen probes."""
    dim = 2
    net = make_net(dim, hidden=(4,), seed=12, scale=2.5)
    rng = np.random.default_rng(6)
    x = f64(rng.normal(size=(3, dim)))
    eps = f64(rng.normal(size=(3, dim)))
    layers = {}
    for gradient in gradients:
        cnf = CNF(net, trace="hutchinson", rtol=tol, atol=tol, gradient=gradient,
                  dtype="float64")
        cnf._noise = lambda x_: eps  # frozen: the loss is a deterministic function
        layers[gradient] = cnf
    return net, layers, x


FORWARD_STATS = ("nfe", "accepted", "rejected", "status")


def _loss_and_grads(cnf, variables, mode="eager"):
    """x -> [loss, dloss/dx, *dloss/dvariables, nfe, accepted, rejected, status].

    The forward solve's statistics are read where the solve ran: under JAX
    the layer's state lives in the differentiated function's scope only, so
    they come out as auxiliary values (the variables go in as arguments, so
    a jitted function sees their current values).
    """

    def loss_fn(x_):
        _, dlogp, kinetic, jac = rnode_states(cnf(x_, training=True, regularize=True))
        # Sums, not ops.mean: Keras averages float64 in float32 off TensorFlow.
        return (ops.sum(dlogp) + ops.sum(kinetic) + ops.sum(jac)) / ops.shape(x_)[0]

    if BACKEND == "jax":
        import jax

        def pure(x_, values):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))) as scope:
                loss = loss_fn(x_)
                stats = [scope.get_current_value(cnf.stats[k]) for k in FORWARD_STATS]
            return loss, stats

        grad = jax.value_and_grad(pure, argnums=(0, 1), has_aux=True)

        def run_values(x_, values):
            (loss, stats), (g_x, g_v) = grad(x_, values)
            return [loss, g_x, *g_v, *stats]

        run_values = compiled(run_values, mode)
        return lambda x_: run_values(x_, [v.value for v in variables])

    def run(x_):
        loss, (g_x,), g_v = gradients(loss_fn, [x_], variables)
        return [loss, g_x, *g_v, *(cnf.stats[k].value for k in FORWARD_STATS)]

    return compiled(run, mode)


def test_gradients_match_finite_differences():
    # dopri5 at 1e-11 (about 50 steps): its error, and the error of
    # differencing an adaptive solve, stay near 1e-11.
    net, layers, x = _frozen_problem(("adjoint", "direct"), tol=1e-11)
    variables = net.trainable_variables
    fast = "graph" if BACKEND == "tensorflow" else MODES[-1]
    runs = {g: _loss_and_grads(cnf, variables, fast) for g, cnf in layers.items()}
    results = {g: [np_(v) for v in run(x)] for g, run in runs.items()}
    steps = results["direct"][-3]
    assert steps > 20 and results["direct"][-2] == 0
    for grads in results.values():
        assert len(grads) == 2 + len(variables) + 4 and all(np.all(np.isfinite(g))
                                                            for g in grads)

    # Directional derivatives along random directions in (x, weights):
    # fourth-order central differences, h = 1e-4 (truncation ~1e-13).
    base = [np_(v) for v in variables]
    x_np = np_(x)
    rng = np.random.default_rng(7)
    h = 1e-4
    for _ in range(2):
        dirs = [rng.normal(size=x.shape)] + [rng.normal(size=b.shape) for b in base]
        values = {}
        for k in (-2, -1, 1, 2):
            for v, b, d in zip(variables, base, dirs[1:]):
                v.assign(b + k * h * d)
            out = runs["direct"](f64(x_np + k * h * dirs[0]))
            # The same accepted/rejected pattern: differences of one smooth branch.
            assert (int(np_(out[-3])), int(np_(out[-2]))) == (steps, 0)
            values[k] = float(out[0])
        for v, b in zip(variables, base):
            v.assign(b)
        fd = (-values[2] + 8 * values[1] - 8 * values[-1] + values[-2]) / (12 * h)
        assert abs(fd) > 1.0
        for gradient, out in results.items():
            analytic = sum(np.sum(g * d) for g, d in zip(out[1:-4], dirs))
            np.testing.assert_allclose(analytic, fd, rtol=1e-9, atol=1e-9, err_msg=gradient)
    # And weight by weight, adjoint and direct agree.
    for a, d in zip(results["adjoint"][1:-4], results["direct"][1:-4]):
        np.testing.assert_allclose(a, d, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("mode", MODES[-1:])
def test_compiled_matches_eager(mode):
    # (PyTorch has the eager mode only: there the test checks the statistics.)
    net, layers, x = _frozen_problem(("adjoint",), tol=1e-5)
    cnf = layers["adjoint"]
    eager = [np_(v) for v in _loss_and_grads(cnf, net.trainable_variables)(x)]
    eager_stats = dict(zip(FORWARD_STATS, (int(v) for v in eager[-4:])))
    assert eager_stats["nfe"] > 6 and eager_stats["status"] == kr.Status.SUCCESS
    if REPORTS_BACKWARD:  # JAX's custom gradient is pure: it reports no statistics
        assert stats_of(cnf)["backward_nfe"] > 6  # the adjoint solve ran
    out = [np_(v) for v in _loss_and_grads(cnf, net.trainable_variables, mode)(x)]
    assert dict(zip(FORWARD_STATS, (int(v) for v in out[-4:]))) == eager_stats
    for a, b in zip(eager, out):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------
# Training and evaluation solvers; regularizer states.


def test_training_and_evaluation_solvers():
    net = make_net(2, seed=14, scale=3.0)
    cnf = CNF(net, trace="hutchinson", method="rk4", step_size=0.25, eval_method="dopri5",
              eval_rtol=1e-6, eval_atol=1e-6, eval_trace="exact", seed=0, dtype="float64")
    x = np.random.default_rng(8).normal(size=(4, 2))

    train = cnf(x, training=True, regularize=True)
    assert set(train.penalties) == {"kinetic", "jacobian"}
    s = stats_of(cnf)
    assert (s["nfe"], s["accepted"], s["rejected"]) == (16, 4, 0)  # rk4, 4 steps of 0.25
    assert cnf(x, training=True).penalties == {}  # no penalty states unless asked

    evaluation = cnf(x, training=False, regularize=True)
    assert evaluation.penalties == {}  # regularize is training's shorthand
    s = stats_of(cnf)
    assert s["nfe"] == 6 * (s["accepted"] + s["rejected"]) + 2 and s["nfe"] != 16
    # Evaluation uses the exact trace: deterministic.
    np.testing.assert_array_equal(np_(cnf(x)[1]), np_(evaluation[1]))
    # The very solves: rk4 with step 0.25 in training, dopri5 at 1e-6 otherwise.
    rk4 = kr.odeint(net, f64(x), method="rk4", step_size=0.25, gradient="none").y
    dopri5 = kr.odeint(net, f64(x), rtol=1e-6, atol=1e-6, gradient="none").y
    np.testing.assert_allclose(np_(train[0]), np_(rk4), rtol=1e-13, atol=1e-13)
    # (The CNF's dopri5 also controls delta_logp, so its steps differ a little.)
    np.testing.assert_allclose(np_(evaluation[0]), np_(dopri5), rtol=0, atol=1e-5)


def test_regularizer_states_do_not_change_the_steps():
    net = make_net(2, seed=8, scale=3.0)
    x = np.random.default_rng(9).normal(size=(8, 2))
    results = {}
    for regularize in (False, True):
        cnf = CNF(net, trace="hutchinson", rtol=1e-5, atol=1e-5, seed=21, dtype="float64")
        out = cnf(x, training=True, regularize=regularize)
        out = [np_(v) for v in (out.z, out.delta_logp, *out.penalties.values())]
        results[regularize] = (out, stats_of(cnf))
    (plain, s0), (reg, s1) = results[False], results[True]
    assert len(plain) == 2 and len(reg) == 4
    assert s0["accepted"] > 3
    for key in ("nfe", "accepted", "rejected"):
        assert s0[key] == s1[key], (key, s0, s1)
    np.testing.assert_allclose(reg[0], plain[0], rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(reg[1], plain[1], rtol=1e-13, atol=1e-14)
    assert np.all(reg[2] > 0) and np.all(reg[3] > 0)


# --------------------------------------------------------------------------
# Serialization.


def test_config_round_trip():
    cnf = CNF(ConcatSquashMLP(hidden=(5,)), trace="hutchinson", noise="rademacher",
              method="rk4", step_size=0.1, eval_method="dopri5", eval_rtol=1e-6,
              eval_atol=1e-7, eval_trace="exact", T=0.5, seed=3, gradient="direct",
              max_steps=50, name="block")
    config = cnf.get_config()
    clone = CNF.from_config(config)
    assert clone.get_config() == config
    assert isinstance(clone.dynamics, ConcatSquashMLP) and clone.dynamics.hidden == (5,)
    assert clone.train_solver == cnf.train_solver
    assert clone.eval_solver == cnf.eval_solver
    assert (clone.trace, clone.eval_trace, clone.noise, clone.T, clone.seed) == (
        "hutchinson", "exact", "rademacher", 0.5, 3)


def test_model_save_load(tmp_path):
    keras.utils.set_random_seed(15)
    net = ConcatSquashMLP(hidden=(8,), zero_init_last=False)
    inputs = keras.Input((2,))
    z, dlogp, _ = CNF(net, trace="exact", rtol=1e-6, atol=1e-6, name="cnf")(inputs)
    model = keras.Model(inputs, [z, dlogp])
    x = np.random.default_rng(10).normal(size=(4, 2)).astype("float32")
    before = [np_(v) for v in model(x)]
    path = tmp_path / "cnf.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    after = [np_(v) for v in loaded(x)]
    assert isinstance(loaded.get_layer("cnf"), CNF)
    assert np.abs(before[1]).max() > 1e-3
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------
# Bad input.


class WrongShape(keras.layers.Layer):
    def call(self, t, z):
        return z[:, :1]


class FirstRowOnly(keras.layers.Layer):
    """Right at build (batch 1), wrong on any larger batch."""

    def call(self, t, z):
        return z[:1]


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
@pytest.mark.parametrize("layer, got, expected", [
    (WrongShape, "(1, 1)", "(1, 2)"),
    (FirstRowOnly, "(1, 2)", "(3, 2)"),
])
def test_dynamics_of_the_wrong_shape(trace, layer, got, expected):
    cnf = CNF(layer(name="bad_dynamics"), trace=trace, eval_trace=trace, name="my_cnf")
    with pytest.raises(ValueError) as info:
        cnf(np.zeros((3, 2), "float32"))
    message = str(info.value)
    assert "my_cnf" in message and "bad_dynamics" in message, message
    assert got in message, message
    # The exact trace evaluates D copies of the batch at once.
    if trace == "hutchinson" or layer is WrongShape:
        assert expected in message, message


def test_bad_arguments():
    net = ConcatSquashMLP(hidden=(4,))
    with pytest.raises(ValueError, match="trace must be one of"):
        CNF(net, trace="hutchinsons")
    with pytest.raises(ValueError, match="eval_trace must be one of"):
        CNF(net, eval_trace="approximate")
    with pytest.raises(ValueError, match="noise must be one of"):
        CNF(net, noise="uniform")
    with pytest.raises(ValueError, match="rademacher.*exact") as info:
        CNF(net, trace="exact", noise="rademacher")
    assert "draws no noise" in str(info.value) and "ignored" in str(info.value)
    with pytest.raises(ValueError, match="rank|batch"):
        CNF(net, trace="exact")(np.zeros((3,), "float32"))


@pytest.mark.parametrize("kwargs, name, value, allowed", [
    (dict(rtol=0.0), "rtol", "0.0", "positive finite number"),
    (dict(atol=-1e-5), "atol", "-1e-05", "positive finite number"),
    (dict(rtol=float("nan")), "rtol", "nan", "positive finite number"),
    (dict(atol="1e-5"), "atol", "'1e-5'", "positive finite number"),
    (dict(method="rk45"), "method", "'rk45'", "['dopri5', 'euler', 'rk4']"),
    (dict(gradient="backprop"), "gradient", "'backprop'", "('adjoint', 'direct', 'none')"),
    (dict(max_steps=0), "max_steps", "0", "integer >= 1"),
    (dict(max_steps=2.5), "max_steps", "2.5", "integer >= 1"),
    (dict(method="rk4"), "step_size", "None", "positive finite"),
    (dict(method="rk4", step_size=-0.25), "step_size", "-0.25", "positive finite"),
    (dict(step_size=0.25), "step_size", "0.25", "['euler', 'rk4']"),
    (dict(eval_rtol=0.0), "eval_rtol", "0.0", "positive finite number"),
    (dict(eval_method="midpoint"), "eval_method", "'midpoint'", "['dopri5', 'euler', 'rk4']"),
    (dict(eval_method="euler"), "eval_step_size", "None", "positive finite"),
    (dict(method="rk4", step_size=0.25, eval_method="dopri5", eval_step_size=0.1),
     "eval_step_size", "0.1", "['euler', 'rk4']"),
    (dict(T=float("inf")), "T", "inf", "positive finite number"),
    (dict(trace="hutchinsons"), "trace", "'hutchinsons'", "('hutchinson', 'exact')"),
    (dict(noise="uniform"), "noise", "'uniform'", "('gaussian', 'rademacher')"),
])
def test_bad_solver_options_fail_when_made(kwargs, name, value, allowed):
    # At construction, not at the first call: a model built with a bad
    # option must not get as far as tracing a training step.
    with pytest.raises(ValueError) as info:
        CNF(ConcatSquashMLP(hidden=(4,)), name="block", **kwargs)
    message = str(info.value)
    assert message.startswith("block: "), message
    assert f"{name} " in message or f"{name}=" in message, message
    assert value in message and allowed in message, message


def test_evaluation_solver_defaults_to_the_training_one():
    net = ConcatSquashMLP(hidden=(4,))
    cnf = CNF(net, method="rk4", step_size=0.25, eval_method="euler")
    assert cnf.eval_solver.step_size == 0.25  # None: "as in training"
    cnf = CNF(net, method="rk4", step_size=0.25, eval_method="dopri5", eval_rtol=1e-6)
    assert (cnf.eval_solver.step_size, cnf.eval_solver.rtol) == (None, 1e-6)
    cnf = CNF(net, rtol=1e-4)
    # As in training, but each sample held to the tolerances (its own error norm).
    assert cnf.train_solver.error_norm == "rms"
    assert cnf.eval_solver == cnf.train_solver.replace(error_norm="per_sample")
    assert CNF(net, eval_error_norm="rms").eval_solver == CNF(net).train_solver
