"""Solver benchmark (issue 2): keras-rnode's dopri5 against TFP's DormandPrince.

The problem is CNF-like: a time-conditioned MLP (t concatenated to z, three
hidden layers of 64 softplus units) on a batch of 2-D states, integrated
from t=0 to t=1 with dopri5 at rtol = atol = 1e-5 in float32. Kernels are
drawn from N(0, 0.5^2) so that the dynamics is not trivial.

Every timed variant is a `tf.function` (graph mode) or a
`tf.function(jit_compile=True)` (XLA). All variants are compiled and
warmed up first, then timed interleaved round-robin (the order shuffled
every round) in this one process, so that a machine shared with other
work slows all of them alike. Both the wall time and the process's CPU
time are recorded; by default TensorFlow runs one thread, whose CPU time
hardly depends on the neighbours' load. The tables report medians and
ratios.

Measured:

1. Ours against `tfp.math.ode.DormandPrince` (its gradient is the adjoint
   method): NFE and time, forward only and forward + gradient of a scalar
   loss with respect to the weights, in graph mode and under XLA.
2. Solver overhead under XLA: (time of a forward solve) / (NFE x time of
   one evaluation of the dynamics). One evaluation is timed inside a
   jit-compiled `tf.while_loop` of explicit Euler steps z <- z + h f(t, z),
   six per iteration like a dopri5 step: the data dependence keeps XLA
   from hoisting the evaluation out of the loop, the call overhead of the
   `tf.function` is paid once for hundreds of evaluations, and what
   remains beside f (an axpy, a sixth of a loop iteration) is the least
   any solver needs per evaluation. The adjoint's backward solve gets the
   same ratio against one vector-Jacobian product of f.
3. XLA against graph mode for the forward + gradient solves, for the
   adjoint and the direct gradient.

Run `python benchmarks/solver.py --help`; `--quick` is a smoke run.
"""

import sys
import time
from pathlib import Path

# _timing (which also makes TensorFlow Keras's default backend), also when loaded by path
sys.path.insert(0, str(Path(__file__).resolve().parent))

import click  # noqa: E402
import numpy as np  # noqa: E402
from _timing import (  # noqa: E402
    command_line,
    common_options,
    compile_all,
    fmt_ms,
    fmt_ratio,
    fmt_us,
    publish,
    ratio,
    section_head,
    set_threads,
    time_interleaved,
    write_results,  # noqa: F401 - the tests reach the shared helper through this script
)

HEADING = "## Solver (issue 2)"


# --------------------------------------------------------------------------
# The problem


def make_problem(batch, seed, width=64, depth=3, std=0.5):
    """Returns (dynamics, variables, y0): dynamics(t, z) -> dz/dt."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    init = keras.initializers.RandomNormal(stddev=std, seed=seed)
    layers = [
        keras.layers.Dense(
            width, activation="softplus", kernel_initializer=init,
            bias_initializer=keras.initializers.RandomNormal(stddev=0.1, seed=seed + i + 1))
        for i in range(depth)
    ]
    layers.append(keras.layers.Dense(2, kernel_initializer=init))
    mlp = keras.Sequential([keras.Input((3,)), *layers])

    def dynamics(t, z):
        tt = tf.broadcast_to(tf.reshape(tf.cast(t, z.dtype), (1, 1)), (tf.shape(z)[0], 1))
        return mlp(tf.concat([z, tt], axis=1))

    y0 = tf.constant(np.random.default_rng(seed).normal(size=(batch, 2)), tf.float32)
    return dynamics, mlp.trainable_variables, y0


def loss_of(y1):
    import tensorflow as tf

    return tf.reduce_mean(tf.reduce_sum(tf.square(y1), axis=-1))


# --------------------------------------------------------------------------
# Variants: each is a zero-argument tf.function returning a tuple of tensors


def build_variants(dynamics, variables, y0, tol, max_steps, include_tfp_xla):
    import tensorflow as tf
    import tensorflow_probability as tfp

    import keras_rnode as kr

    def ours(gradient, with_grad):
        def fn():
            if not with_grad:
                sol = kr.odeint(dynamics, y0, 0.0, 1.0, rtol=tol, atol=tol,
                                max_steps=max_steps, gradient="none")
                return sol.y, sol.stats["nfe"]
            with tf.GradientTape() as tape:
                sol = kr.odeint(dynamics, y0, 0.0, 1.0, rtol=tol, atol=tol,
                                max_steps=max_steps, gradient=gradient)
                loss = loss_of(sol.y)
            grads = tape.gradient(loss, variables)
            return (loss, sol.stats["nfe"], *grads)
        return fn

    def theirs(with_grad):
        solver = tfp.math.ode.DormandPrince(rtol=tol, atol=tol)

        def solve():
            res = solver.solve(dynamics, 0.0, y0, solution_times=[1.0])
            return res.states[0], res.diagnostics.num_ode_fn_evaluations

        def fn():
            if not with_grad:
                return solve()
            with tf.GradientTape() as tape:
                y1, nfe = solve()
                loss = loss_of(y1)
            grads = tape.gradient(loss, variables)
            return (loss, nfe, *grads)
        return fn

    specs = [
        # (name, solver, mode, task, fn)
        ("ours", "graph", "forward", ours(None, False)),
        ("ours", "xla", "forward", ours(None, False)),
        ("tfp", "graph", "forward", theirs(False)),
        ("tfp", "xla", "forward", theirs(False)),
        ("ours adjoint", "graph", "fwd+grad", ours("adjoint", True)),
        ("ours adjoint", "xla", "fwd+grad", ours("adjoint", True)),
        ("ours direct", "graph", "fwd+grad", ours("direct", True)),
        ("ours direct", "xla", "fwd+grad", ours("direct", True)),
        ("tfp adjoint", "graph", "fwd+grad", theirs(True)),
        ("tfp adjoint", "xla", "fwd+grad", theirs(True)),
    ]
    variants = {}
    for solver, mode, task, fn in specs:
        if solver.startswith("tfp") and mode == "xla" and not include_tfp_xla:
            continue
        variants[(solver, mode, task)] = tf.function(fn, jit_compile=(mode == "xla"))
    return variants


UNROLL = 6  # evaluations per loop iteration in the baselines, as in a dopri5 step


def build_baselines(dynamics, variables, y0, n_evals):
    """Per-evaluation time under XLA: n_evals Euler steps in one compiled loop.

    Each loop iteration makes UNROLL steps, so that the loop's own cost is
    spread over as many evaluations as in a dopri5 step (FSAL: 6).
    """
    import tensorflow as tf

    iterations = max(n_evals // UNROLL, 1)
    h = 1.0 / (iterations * UNROLL)
    # The tf.Variables under the Keras variables (what a tape watches).
    tf_vars = [getattr(v, "value", v) for v in variables]

    def euler():
        def body(i, z):
            for j in range(UNROLL):
                t = tf.cast(i * UNROLL + j, z.dtype) * h
                z = z + h * dynamics(t, z)
            return i + 1, z
        _, z = tf.while_loop(lambda i, z: i < iterations, body, (tf.constant(0), y0))
        return (z,)

    def vjp_loop():
        # The adjoint's augmented dynamics: f and a^T df/d(z, theta).
        def body(i, z, a, g):
            for j in range(UNROLL):
                t = 1.0 - tf.cast(i * UNROLL + j, z.dtype) * h
                with tf.GradientTape(watch_accessed_variables=False) as tape:
                    tape.watch(z)
                    tape.watch(tf_vars)
                    f = dynamics(t, z)
                gz, *gv = tape.gradient(f, [z, *tf_vars], output_gradients=a)
                z, a, g = z - h * f, a + h * gz, [gi + h * vi for gi, vi in zip(g, gv)]
            return i + 1, z, a, g
        zeros = [tf.zeros_like(v) for v in tf_vars]
        _, z, a, g = tf.while_loop(lambda i, *_: i < iterations, body,
                                   (tf.constant(0), y0, tf.ones_like(y0), zeros))
        return (z, a, *g)

    def single():
        return (dynamics(0.5, y0),)

    return {
        ("f loop", "xla", "per-eval"): tf.function(euler, jit_compile=True),
        ("f loop", "graph", "per-eval"): tf.function(euler),
        ("vjp loop", "xla", "per-eval"): tf.function(vjp_loop, jit_compile=True),
        ("f single call", "xla", "per-eval"): tf.function(single, jit_compile=True),
    }


# --------------------------------------------------------------------------
# Measuring


def count_evaluations(dynamics, variables, y0, tol, max_steps):
    """Forward and backward NFE of every gradient variant, in graph mode.

    The dynamics is wrapped with a counter so that the backward solves
    (whose statistics TFP does not return) are counted too. Returns
    {name: (forward NFE, backward NFE, steps)} where `steps` holds our
    solver's own statistics of both solves (None for TFP).
    """
    import tensorflow as tf
    import tensorflow_probability as tfp

    import keras_rnode as kr

    counter = tf.Variable(0, dtype=tf.int64, trainable=False)

    def counted(t, z):
        with tf.control_dependencies([counter.assign_add(1)]):
            return tf.identity(dynamics(t, z))

    def count(solve):
        @tf.function
        def fn():
            counter.assign(0)
            backward = {}  # filled by on_backward while the tape builds the gradient
            with tf.GradientTape() as tape:
                y1, forward_stats = solve(backward)
                loss = loss_of(y1)
            with tf.control_dependencies([tf.identity(loss)]):
                forward = counter.read_value()
            grads = tape.gradient(loss, variables)
            with tf.control_dependencies(grads):
                total = counter.read_value()
            return forward, total, {"forward": forward_stats, "backward": dict(backward)}
        forward, total, stats = fn()
        steps = {k: {n: int(v) for n, v in s.items()} for k, s in stats.items() if s}
        return int(forward), int(total - forward), steps or None

    def ours(gradient):
        def solve(backward):
            sol = kr.odeint(counted, y0, 0.0, 1.0, rtol=tol, atol=tol, max_steps=max_steps,
                            gradient=gradient, on_backward=backward.update)
            return sol.y, sol.stats
        return solve

    counts = {f"ours {g}": count(ours(g)) for g in ("adjoint", "direct")}
    solver = tfp.math.ode.DormandPrince(rtol=tol, atol=tol)
    counts["tfp adjoint"] = count(
        lambda backward: (solver.solve(counted, 0.0, y0, solution_times=[1.0]).states[0], {}))
    return counts


# --------------------------------------------------------------------------
# Reporting


PER_EVAL = {
    "f": ("f loop", "xla", "per-eval"),
    "vjp": ("vjp loop", "xla", "per-eval"),
    "f graph": ("f loop", "graph", "per-eval"),
    "single": ("f single call", "xla", "per-eval"),
}


def report(args, timings, nfe, counts, failures, compile_s, wall_s):
    def med(key, metric="wall"):
        return timings.get(key, metric)

    def per_eval(name, metric="wall"):
        value = med(PER_EVAL[name], metric)
        if value is None:
            return None
        return value if name == "single" else value / args["n_evals"]

    def wall_cell(key):
        if key not in timings:
            return "-"
        return f"{fmt_ms(med(key))} ({fmt_ms(timings.minimum(key))})"

    lines = section_head(HEADING, args["command"], "keras", "tensorflow-probability")
    add = lines.append
    add(f"- Problem: MLP [z, t] -> 3 x 64 softplus -> 2, kernels N(0, 0.5^2), "
        f"batch {args['batch']}, float32, t: 0 -> 1, dopri5 rtol = atol = {args['tol']:g}; "
        f"loss = mean |y(1)|^2, gradient w.r.t. the {args['n_vars']} weight tensors.")
    add(f"- Timing: {args['repeats']} interleaved rounds (order shuffled each round) in one "
        f"process, TensorFlow threads: {args['threads']}. Wall time as median (min) and the "
        f"median of the process's CPU time. On a machine shared with other work the wall "
        f"time of a round depends on the neighbours; with one thread the CPU time does not, "
        f"so the CPU ratios are the steadier ones. Whole run {wall_s:.0f} s.")
    add("")

    # 1. ours vs tfp
    add("### 1. Ours vs tfp.math.ode.DormandPrince")
    add("")
    add("NFE: evaluations of the dynamics (on the whole batch) per solve. Forward NFE from "
        "each solver's own statistics in that mode; backward NFE counted by a counting "
        "wrapper around the dynamics (graph mode). Ratios tfp / ours in the same mode: "
        "> 1 means ours is faster.")
    add("")
    add("| solver | mode | task | NFE fwd | NFE bwd | wall [ms] | CPU [ms] "
        "| tfp / ours (wall) | tfp / ours (CPU) |")
    add("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for task, ours_names, tfp_name in (
        ("forward", ["ours"], "tfp"),
        ("fwd+grad", ["ours adjoint", "ours direct"], "tfp adjoint"),
    ):
        for mode in ("graph", "xla"):
            for name in [*ours_names, tfp_name]:
                key = (name, mode, task)
                if key in failures:
                    add(f"| {name} | {mode} | {task} | - | - | failed | - | - | - |")
                    continue
                if key not in timings:
                    add(f"| {name} | {mode} | {task} | - | - | not run | - | - | - |")
                    continue
                c = counts.get(name)
                bwd = c[1] if (c and task == "fwd+grad") else "-"
                other = (tfp_name, mode, task)
                rel = [fmt_ratio(ratio(med(other, m), med(key, m))) for m in ("wall", "cpu")]
                add(f"| {name} | {mode} | {task} | {nfe.get(key, '-')} | {bwd} | "
                    f"{wall_cell(key)} | {fmt_ms(med(key, 'cpu'))} | {rel[0]} | {rel[1]} |")
    add("")
    for name in ("ours adjoint", "ours direct"):
        steps = (counts.get(name) or (0, 0, None))[2] or {}
        add(f"- {name} steps (graph mode): " + "; ".join(
            f"{k}: NFE {v['nfe']}, accepted {v['accepted']}, rejected {v['rejected']}"
            for k, v in steps.items()) + ".")
    add("")
    add("Goal: NFE <= tfp's and >= 2x faster. Ours under XLA against tfp under XLA, and "
        "against tfp in graph mode (TFP's usual use), as wall / CPU ratios:")
    add("")
    for label, ours_key, tfp_task in (
        ("forward", ("ours", "xla", "forward"), ("tfp", "forward")),
        ("forward + gradient, adjoint", ("ours adjoint", "xla", "fwd+grad"),
         ("tfp adjoint", "fwd+grad")),
        ("forward + gradient, direct", ("ours direct", "xla", "fwd+grad"),
         ("tfp adjoint", "fwd+grad")),
    ):
        cells = []
        for mode in ("xla", "graph"):
            other = (tfp_task[0], mode, tfp_task[1])
            cells.append(f"vs tfp {mode} {fmt_ratio(ratio(med(other), med(ours_key)))}x / "
                         f"{fmt_ratio(ratio(med(other, 'cpu'), med(ours_key, 'cpu')))}x")
        add(f"- {label}: " + "; ".join(cells))
    n_ours = nfe.get(("ours", "xla", "forward"))
    tfp_key = ("tfp", "xla", "forward")
    if n_ours and per_eval("f") and tfp_key in timings:
        add(f"- bound: a forward solve with no overhead at all (our NFE x one XLA evaluation) "
            f"would be {fmt_ratio(ratio(med(tfp_key), n_ours * per_eval('f')))}x / "
            f"{fmt_ratio(ratio(med(tfp_key, 'cpu'), n_ours * per_eval('f', 'cpu')))}x "
            f"faster than tfp under XLA")
    add("")
    for key, why in failures.items():
        add(f"- {' / '.join(key)} failed: `{why}`")
    if failures:
        add("")

    # 2. overhead
    add("### 2. Solver overhead under XLA")
    add("")
    add(f"Per-evaluation time: a jit-compiled `tf.while_loop` of {args['n_evals']} Euler steps "
        f"z <- z + h f(t, z) ({UNROLL} per iteration, as many evaluations as a dopri5 step "
        f"makes), divided by {args['n_evals']}. The data dependence stops XLA hoisting f out "
        f"of the loop, the call overhead is paid once, and what is left beside f (an axpy and "
        f"1/{UNROLL} of a loop iteration) is the least any solver needs per evaluation. "
        f"Wall / CPU: f {fmt_us(per_eval('f'))} / {fmt_us(per_eval('f', 'cpu'))}; one VJP of "
        f"f w.r.t. (z, weights), the adjoint's evaluation, {fmt_us(per_eval('vjp'))} / "
        f"{fmt_us(per_eval('vjp', 'cpu'))}. For reference: one jit-compiled call of f alone "
        f"(its call overhead included) {fmt_us(per_eval('single'))} / "
        f"{fmt_us(per_eval('single', 'cpu'))}; the Euler loop in graph mode "
        f"{fmt_us(per_eval('f graph'))} / {fmt_us(per_eval('f graph', 'cpu'))} per step.")
    add("")
    add("| solve | NFE | wall [ms] | NFE x eval, wall [ms] | ratio (wall) "
        "| CPU [ms] | NFE x eval, CPU [ms] | ratio (CPU) |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|")
    fwd_key = ("ours", "xla", "forward")
    for name, key, ev in (("ours forward", fwd_key, "f"), ("tfp forward", tfp_key, "f")):
        if key in timings and per_eval(ev):
            cells = []
            for m in ("wall", "cpu"):
                ideal = nfe[key] * per_eval(ev, m)
                cells += [fmt_ms(med(key, m)), fmt_ms(ideal), fmt_ratio(ratio(med(key, m), ideal))]
            add(f"| {name} | {nfe[key]} | " + " | ".join(cells) + " |")
    adj_key = ("ours adjoint", "xla", "fwd+grad")
    if adj_key in timings and fwd_key in timings and counts.get("ours adjoint") and per_eval("vjp"):
        nb = counts["ours adjoint"][1]
        cells = []
        for m in ("wall", "cpu"):
            back, ideal = med(adj_key, m) - med(fwd_key, m), nb * per_eval("vjp", m)
            cells += [fmt_ms(back), fmt_ms(ideal), fmt_ratio(ratio(back, ideal))]
        add(f"| ours adjoint backward (fwd+grad - fwd; VJP evaluations) | {nb} | "
            + " | ".join(cells) + " |")
    add("")
    add("Goal: forward overhead ratio < 1.2 under XLA.")
    add("")

    # 3. xla vs graph
    add("### 3. XLA vs graph mode")
    add("")
    add("| solver | task | graph wall [ms] | xla wall [ms] | graph / xla (wall) "
        "| graph CPU [ms] | xla CPU [ms] | graph / xla (CPU) |")
    add("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, task in (("ours adjoint", "fwd+grad"), ("ours direct", "fwd+grad"),
                       ("tfp adjoint", "fwd+grad"), ("ours", "forward"), ("tfp", "forward")):
        g, x = (name, "graph", task), (name, "xla", task)
        add(f"| {name} | {task} | {wall_cell(g)} | {wall_cell(x)} | "
            f"{fmt_ratio(ratio(med(g), med(x)))} | {fmt_ms(med(g, 'cpu'))} | "
            f"{fmt_ms(med(x, 'cpu'))} | {fmt_ratio(ratio(med(g, 'cpu'), med(x, 'cpu')))} |")
    add("")
    add("Goal (with gradients): XLA not slower, graph / xla >= 1.")
    add("")
    add("First call (trace + compile + one run) [s]: " + ", ".join(
        f"{' / '.join(k)} {v:.1f}" for k, v in compile_s.items() if k[2] != "per-eval") + ".")
    add("")
    return "\n".join(lines)


# --------------------------------------------------------------------------


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--repeats", type=click.IntRange(1), default=None,
              help="Interleaved timing rounds (default 15; 2 with --quick).")
@click.option("--batch", type=click.IntRange(1), default=None,
              help="Batch of 2-D states (default 512; 64 with --quick).")
@click.option("--tol", type=float, default=1e-5, show_default=True, help="rtol = atol.")
@click.option("--evals", "n_evals", type=click.IntRange(1), default=None,
              help="Evaluations in the per-evaluation baseline (default 480; rounded to a "
                   f"multiple of {UNROLL}).")
@click.option("--tfp-xla/--no-tfp-xla", default=True, show_default=True,
              help="Also try TFP's solver under jit_compile=True.")
@common_options(HEADING,
                quick="Smoke run: tiny batch and repeats; results not written unless --results.",
                no_write="Only print the table.",
                threads="TensorFlow intra- and inter-op threads; 0 keeps TensorFlow's default "
                        "(all cores). One thread is least disturbed by other work on a shared "
                        "machine.")
def main(repeats, batch, tol, n_evals, tfp_xla, quick, results, no_write, threads, seed):
    """Benchmark keras-rnode's dopri5 against TFP's DormandPrince (issue 2)."""
    threads_label = set_threads(threads)
    started = time.perf_counter()
    repeats = repeats or (2 if quick else 15)
    batch = batch or (64 if quick else 512)
    n_evals = n_evals or (48 if quick else 480)
    n_evals = max(n_evals // UNROLL, 1) * UNROLL
    max_steps = 1000
    command = command_line()

    dynamics, variables, y0 = make_problem(batch, seed)
    variants = build_variants(dynamics, variables, y0, tol, max_steps, tfp_xla)
    variants.update(build_baselines(dynamics, variables, y0, n_evals))
    click.echo(f"compiling {len(variants)} variants ...", err=True)
    compiled, failures, compile_s = compile_all(variants)
    for key, why in failures.items():
        click.echo(f"  {' / '.join(key)}: FAILED {why}", err=True)

    nfe = {}
    for key, fn in compiled.items():
        if key[2] in ("forward", "fwd+grad"):
            nfe[key] = int(fn()[1])
    click.echo("counting evaluations ...", err=True)
    counts = count_evaluations(dynamics, variables, y0, tol, max_steps)

    click.echo(f"timing, {repeats} rounds ...", err=True)
    timings = time_interleaved(compiled, repeats, seed)

    args = dict(command=command, batch=batch, tol=tol, repeats=repeats, n_evals=n_evals,
                n_vars=len(variables), threads=threads_label)
    section = report(args, timings, nfe, counts, failures, compile_s,
                     time.perf_counter() - started)
    publish(section, results, quick, no_write)


if __name__ == "__main__":
    main()
