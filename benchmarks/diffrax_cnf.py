"""Our CNF written with diffrax: the peer that benchmarks/backends.py and gpu_bench.py time.

The dynamics are the keras-rnode network itself, called through Keras's
`stateless_call` with copies of its weights, so both solve the same ODE
from the same start. State (z, delta_logp, kinetic, jacobian) as in
RNODE (Finlay et al. 2020, eqs. 5-6); Dopri5 with a PID controller whose
norm pools the RMS over z and delta_logp only, as ours does (the
regularizer states do not steer the steps); loss nll + 0.01 kinetic +
0.01 jacobian. Only JAX, diffrax and NumPy are imported: the GPU machine
has no TensorFlow.
"""

import numpy as np


def diffrax_step(net, x, tol=1e-5, trace="exact", adjoint=None, seed=0):
    """A jitted (loss, accepted steps) and gradient of the CNF on the batch `x`.

    Args:
        net: a built keras-rnode dynamics layer (`cnf.dynamics`), JAX backend.
        x: float32 array (batch, d), the data.
        tol: dopri5 rtol = atol.
        trace: "exact" (d jvps, one per basis vector) or "hutchinson" (one
            Gaussian probe per sample, drawn from `seed` and fixed for the solve).
        adjoint: a diffrax adjoint; default RecursiveCheckpointAdjoint
            (backpropagation through the steps, the counterpart of our direct
            gradient). BacksolveAdjoint is the counterpart of our adjoint.

    Returns a function of no arguments that runs one step, waits for the
    gradient and returns (loss, number of accepted steps); NFE = 6 steps + 1.
    """
    import diffrax
    import jax
    import jax.numpy as jnp

    if trace not in ("exact", "hutchinson"):
        raise ValueError(f"trace must be 'exact' or 'hutchinson', got {trace!r}")
    adjoint = adjoint or diffrax.RecursiveCheckpointAdjoint()
    # Copies: Keras's JAX trainer donates the variables' buffers to its step.
    params = [jnp.array(np.asarray(v.value)) for v in net.trainable_variables]
    frozen = [jnp.array(np.asarray(v.value)) for v in net.non_trainable_variables]
    x = jnp.asarray(x)
    if trace == "exact":
        probes = [jnp.zeros_like(x).at[:, i].set(1.0) for i in range(x.shape[1])]
    else:
        probes = [jax.random.normal(jax.random.PRNGKey(seed), x.shape, x.dtype)]

    def field(t, state, weights):
        def f(z):
            return net.stateless_call(weights, frozen, t, z)[0]

        out, products = None, []
        for e in probes:
            out, jv = jax.jvp(f, (state[0],), (e,))
            products.append((e, jv))
        # exact: sum_i (J e_i)_i and ||J||_F^2 / d; Hutchinson: eps.(J eps), ||J eps||^2 / d
        divergence = sum(jnp.sum(e * jv, axis=1) for e, jv in products)
        frobenius = sum(jnp.mean(jv ** 2, axis=1) for _, jv in products)
        return out, -divergence, 0.5 * jnp.mean(out ** 2, axis=1), frobenius

    def norm(error):
        if isinstance(error[0], tuple):
            # BacksolveAdjoint's backward state (y, a_y, a_params, ...): y and
            # its adjoint steer, the parameters' adjoint not (as in ours).
            leaves = jax.tree_util.tree_leaves(error[:2])
        else:
            leaves = [error[0], error[1]]
        return jnp.sqrt(sum(jnp.sum(v ** 2) for v in leaves) / sum(v.size for v in leaves))

    zeros = jnp.zeros(x.shape[0], x.dtype)
    t0, t1 = jnp.zeros((), x.dtype), jnp.ones((), x.dtype)

    def loss(weights):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field), diffrax.Dopri5(), t0, t1, None,
            (x, zeros, zeros, zeros), args=weights,
            stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol, norm=norm),
            adjoint=adjoint, max_steps=1000)
        z, delta, kinetic, jacobian = (v[-1] for v in sol.ys)
        log_p = -0.5 * jnp.sum(z ** 2, axis=1) - jnp.log(2 * jnp.pi) - delta
        value = -jnp.mean(log_p) + 0.01 * jnp.mean(kinetic) + 0.01 * jnp.mean(jacobian)
        return value, sol.stats["num_steps"]

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))

    def run():
        (value, steps), grads = step(params)
        jax.block_until_ready(grads)
        return float(value), int(steps)

    return run
