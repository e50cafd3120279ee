"""Where the time of one CNF training step goes (issue 5).

The problem of benchmarks/cnf_step.py (ConcatSquashMLP 3 x 64 softplus,
batch 512 of 8gaussians, Hutchinson trace, dopri5 at 1e-5, adjoint, the
two RNODE regularizers), ours under XLA with one TensorFlow thread.

A step is split by measuring its parts on their own, each compiled with
XLA and timed interleaved with the whole step:

- the network: n evaluations of the dynamics f(t, z) alone, in a loop
  whose data dependence (Euler steps z <- z + h f) stops XLA from hoisting
  f out of it, n = the step's forward NFE;
- the augmented evaluation: the same loop over what the forward solve
  evaluates at each stage (f, the Hutchinson product eps^T J, the trace
  and the two regularizer integrands, the code of kr.layers.divergence);
- the adjoint evaluation: the same loop over what the backward solve
  evaluates (the vector-Jacobian product of the augmented dynamics with
  respect to the state and the weights), n = the step's backward NFE;
- the forward solve alone, and the whole step.

What is left of the forward solve after its evaluations, and of the
backward part (step - forward solve) after its evaluations, is the
solver's own work (the Runge-Kutta combinations, the error norm, the
step-size control, the loop) plus the loss and the tape.

Run `python benchmarks/step_profile.py --help`; `--quick` is a smoke run.
"""

import sys
from pathlib import Path

# _timing (which also makes TensorFlow Keras's default backend) and cnf_step
sys.path.insert(0, str(Path(__file__).resolve().parent))

import click  # noqa: E402
from _timing import (  # noqa: E402
    command_line,
    common_options,
    compile_all,
    fmt_ms,
    publish,
    run_once,
    section_head,
    set_threads,
    time_interleaved,
)

HEADING = "## Where a CNF training step's time goes (issue 5)"
UNROLL = 6  # evaluations per loop iteration, as in a dopri5 step (FSAL)


def evaluation_loops(mlp, x, eps, n_forward, n_backward):
    """Compiled loops of n evaluations of the network, the augmented and the adjoint dynamics."""
    import tensorflow as tf
    from keras import ops

    from keras_rnode import backend
    from keras_rnode.layers import divergence

    variables = [getattr(v, "value", v) for v in mlp.trainable_variables]

    def augmented(t, state):
        z = state[0]
        f, tr, frobenius = divergence.hutchinson(lambda z_: mlp(t, z_), z, eps)
        return [f, -tr, 0.5 * divergence.event_mean(ops.square(f)), frobenius]

    def loop(n, body, state):
        iterations = max(n // UNROLL, 1)
        h = 1.0 / (iterations * UNROLL)

        def unrolled(i, *state):
            state = list(state)
            for j in range(UNROLL):
                t = tf.cast(i * UNROLL + j, x.dtype) * h
                state = body(t, h, state)
            return (i + 1, *state)
        return tf.while_loop(lambda i, *_: i < iterations, unrolled, (tf.constant(0), *state))[1:]

    def network(t, h, state):
        return [state[0] + h * mlp(t, state[0])]

    def forward_evaluation(t, h, state):
        return [s + h * d for s, d in zip(state, augmented(t, state))]

    def adjoint_evaluation(t, h, state):
        y, a, g = state[:4], state[4:8], state[8:]
        f, grads_y, grads_p = backend.vjp(
            lambda y_, p: augmented(1.0 - t, y_), y, variables, a)
        return ([v - h * d for v, d in zip(y, f)] + [v + h * d for v, d in zip(a, grads_y)]
                + [v + h * d for v, d in zip(g, grads_p)])

    batch = x.shape[0]
    zeros = tf.zeros((batch,), x.dtype)
    y = [x, zeros, zeros, zeros]
    a = [tf.ones_like(x), tf.ones_like(zeros), tf.ones_like(zeros), tf.ones_like(zeros)]
    g = [tf.zeros_like(v) for v in variables]
    jit = dict(jit_compile=True)
    return {
        "network": tf.function(lambda: loop(n_forward, network, [x]), **jit),
        "augmented": tf.function(lambda: loop(n_forward, forward_evaluation, y), **jit),
        "adjoint": tf.function(lambda: loop(n_backward, adjoint_evaluation, y + a + g), **jit),
    }


def step_functions(mlp, x, eps, tol):
    """The whole training step and its forward solve alone, compiled with XLA."""
    import tensorflow as tf
    from cnf_step import ours_step

    step = ours_step(mlp, x, eps, method="dopri5", rtol=tol, atol=tol, gradient="adjoint")

    import keras_rnode as kr

    cnf = kr.layers.CNF(mlp, trace="hutchinson", method="dopri5", rtol=tol, atol=tol)
    cnf.build(x.shape)
    cnf._noise = lambda z: eps  # the step's probe  # noqa: SLF001

    def forward():
        return (*cnf(x, training=True, regularize=True), cnf.stats["nfe"].value)

    return {"step": tf.function(step, jit_compile=True),
            "forward solve": tf.function(forward, jit_compile=True)}


def breakdown(cpu, nfe_forward, nfe_backward, n_forward, n_backward):
    """Rows (part, ms per step) from the CPU medians; the loops scaled to the step's NFE."""
    per = {k: cpu[k] / n for k, n in (("network", n_forward), ("augmented", n_forward),
                                       ("adjoint", n_backward))}
    network = nfe_forward * per["network"]
    augmented = nfe_forward * per["augmented"]
    adjoint = nfe_backward * per["adjoint"]
    backward = cpu["step"] - cpu["forward solve"]
    rows = [
        ("network f(t, z), forward NFE x one evaluation", network),
        ("Hutchinson product, trace and regularizer integrands", augmented - network),
        ("forward solver's own work", cpu["forward solve"] - augmented),
        ("adjoint evaluations (VJP of the augmented dynamics), backward NFE x one", adjoint),
        ("backward solver's own work, loss and tape", backward - adjoint),
    ]
    return rows, per


def report(args, cpu, wall, nfe, rows, per, total_s):
    step = cpu["step"]
    lines = section_head(HEADING, args["command"])
    add = lines.append
    add(f"- Problem: benchmarks/cnf_step.py's (ConcatSquashMLP 3 x 64 softplus, batch "
        f"{args['batch']}, Hutchinson, dopri5 rtol = atol = {args['tol']:g}, adjoint, both "
        f"regularizers), ours under XLA, TensorFlow threads {args['threads']}; "
        f"{args['repeats']} interleaved rounds, medians of the process's CPU time (wall in "
        f"brackets). The step took {nfe[0]} forward and {nfe[1]} backward evaluations. "
        f"Whole run {total_s:.0f} s.")
    add("")
    add("| part of one step | CPU [ms] | share |")
    add("|---|---:|---:|")
    for name, ms in rows:
        add(f"| {name} | {fmt_ms(ms)} | {ms / step:.0%} |")
    add(f"| **whole step** | **{fmt_ms(step)}** ({fmt_ms(wall['step'])} wall) | 100% |")
    add("")
    add(f"One evaluation, CPU: network {per['network'] * 1e6:.0f} us, augmented (forward "
        f"solve) {per['augmented'] * 1e6:.0f} us ({per['augmented'] / per['network']:.2f}x "
        f"the network), adjoint {per['adjoint'] * 1e6:.0f} us "
        f"({per['adjoint'] / per['network']:.2f}x).")
    evaluations = rows[0][1] + rows[1][1] + rows[3][1]
    add(f"The evaluations, measured alone, add up to {evaluations / step:.0%} of the step; the "
        f"difference, {fmt_ms(step - evaluations)} ms, is the solvers' own work, the loss and "
        f"the tape, together with this estimate's error (an evaluation in a plain loop is not "
        f"compiled exactly as inside the solver).")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--repeats", type=click.IntRange(1), default=None,
              help="Interleaved timing rounds (default 15; 2 with --quick).")
@click.option("--batch", type=click.IntRange(1), default=None,
              help="Batch (default 512; 64 with --quick).")
@click.option("--tol", type=float, default=1e-5, show_default=True, help="dopri5 rtol = atol.")
@click.option("--weight-scale", type=float, default=4.0, show_default=True,
              help="Multiplies the network's kernels, as in cnf_step.py.")
@common_options(HEADING, quick="Smoke run; RESULTS.md not written unless --results.",
                no_write="Only print the report.")
def main(repeats, batch, tol, weight_scale, quick, results, no_write, threads, seed):
    """Split one CNF training step into the network, its derivatives and the solver."""
    import time

    from cnf_step import make_problem

    started = time.perf_counter()
    args = dict(command=command_line(), threads=set_threads(threads), tol=tol,
                repeats=repeats or (2 if quick else 15), batch=batch or (64 if quick else 512))
    mlp, x, eps = make_problem(args["batch"], seed, weight_scale)
    steps = step_functions(mlp, x, eps, tol)
    out = run_once(steps["step"])[2]
    nfe = (int(out[2]), int(out[3]))
    # Loops a little longer than a step's evaluations, in multiples of UNROLL.
    n_forward, n_backward = (UNROLL * max(-(-n // UNROLL), 1) for n in nfe)
    variants = {**steps, **evaluation_loops(mlp, x, eps, n_forward, n_backward)}
    variants, failures, _ = compile_all(variants)
    if failures:
        raise click.ClickException(f"failed to run: {failures}")
    timings = time_interleaved(variants, args["repeats"], seed)
    cpu = {k: timings.get(k, "cpu") for k in variants}
    wall = {k: timings.get(k) for k in variants}
    rows, per = breakdown(cpu, *nfe, n_forward, n_backward)
    section = report(args, cpu, wall, nfe, rows, per, time.perf_counter() - started)
    publish(section, results, quick, no_write)


if __name__ == "__main__":
    main()
