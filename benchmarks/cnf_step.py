"""CNF training-step benchmark (issue 5): keras-rnode's CNF against tfp.bijectors.FFJORD.

One training step of a continuous normalizing flow on 2-D data: the
forward solve of the augmented ODE, loss = mean(-log p(x)) (+ for ours the
RNODE regularizers 0.01 * kinetic + 0.01 * jacobian), and the gradient of
the loss with respect to the dynamics' weights.

The problem: `kr.layers.ConcatSquashMLP(hidden=(64, 64, 64), "softplus")`
with fixed, non-trivial weights (Glorot-uniform kernels multiplied by
--weight-scale, the last layer not zeroed), a batch of 512 points of
`toy("8gaussians")`, float32, Hutchinson trace with Gaussian noise, dopri5
at rtol = atol = 1e-5, adjoint gradients.

- Ours: `kr.layers.CNF` (regularize=True: it also integrates the kinetic
  and Jacobian states) inside a `tf.function`, in graph mode and with
  jit_compile=True.
- Theirs: `tfp.bijectors.FFJORD` with
  trace_augmentation_fn=tfp.bijectors.ffjord.trace_jacobian_hutchinson and
  ode_solve_fn=tfp.math.ode.DormandPrince(rtol, atol).solve (whose gradient
  is its default adjoint), the log-density through a
  TransformedDistribution of a standard normal; graph mode and XLA.

Both use the same weights and the same probe eps (TFP through the
`sample_fn` argument of trace_jacobian_hutchinson, ours by replacing the
layer's noise draw), so both integrate the same ODE: the NLL values agree
to float32 rounding. FFJORD integrates its inverse map forward in time
with dynamics -g(1 - t, z); giving it g(t, z) = -f(1 - t, z) makes that f.

NFE: evaluations of the dynamics network (on the whole batch) per step,
forward and backward. Ours reports both in `cnf.stats`; TFP's are counted
by a counting wrapper around the network (graph mode). The graph-mode
variants of both run with that wrapper (one variable increment per
evaluation, alike for both); the XLA variants without.

Also measured, for ours: XLA against graph mode, and gradient="adjoint"
against gradient="direct" as the number of steps grows (fixed-step RK4,
step 1/n): time per step and the peak memory growth of a step. Peak
memory: TensorFlow keeps no allocator statistics on the CPU, so each n runs
in a fresh subprocess with glibc's mmap threshold fixed at 64 KiB (every
large buffer is returned to the system when freed); after two warm-up
calls the kernel's peak-RSS mark is reset (/proc/self/clear_refs) and the
peak RSS of the next call minus the RSS before it is the step's memory.
On a GPU, tf.config.experimental.get_memory_info is used instead.

Timing as in benchmarks/solver.py (shared helpers in benchmarks/_timing.py):
interleaved rounds in one process, medians, wall and CPU time, one
TensorFlow thread. Run `python benchmarks/cnf_step.py --help`; `--quick`
is a smoke run.
"""

import functools
import json
import os
import subprocess
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
    run_once,
    section_head,
    set_threads,
    time_interleaved,
)

HEADING = "## CNF training step (issue 5)"
LAMBDA = 0.01  # lambda_K = lambda_J, the paper's values
LOG_2PI = float(np.log(2 * np.pi))


# --------------------------------------------------------------------------
# The problem


def make_problem(batch, seed, weight_scale):
    """(mlp, x, eps): the dynamics net with fixed weights, a data batch, the probe."""
    import keras
    import tensorflow as tf

    import keras_rnode as kr

    keras.utils.set_random_seed(seed)
    x = tf.constant(kr.datasets.toy("8gaussians", batch, seed=seed))
    mlp = kr.layers.ConcatSquashMLP(hidden=(64, 64, 64), activation="softplus",
                                    zero_init_last=False)
    mlp(0.0, x[:1])
    for v in mlp.trainable_variables:
        if v.path.endswith("/kernel"):  # the main kernels; gates and hyper-biases as drawn
            v.assign(v * weight_scale)
    eps = tf.constant(np.random.default_rng(seed + 1).standard_normal((batch, 2)), tf.float32)
    return mlp, x, eps


def make_counter():
    import tensorflow as tf

    # Not trainable: a gradient tape must not take it for a weight.
    return tf.Variable(0, dtype=tf.int64, trainable=False, name="nfe_counter")


def counting(fn, counter):
    """fn(t, z) that also adds one to `counter` each time it is evaluated."""
    import tensorflow as tf

    def counted(t, z):
        with tf.control_dependencies([counter.assign_add(1)]):
            return tf.identity(fn(t, z))
    return counted


def std_normal_log_prob(z):
    import tensorflow as tf

    return -0.5 * tf.reduce_sum(tf.square(z), axis=-1) - 0.5 * LOG_2PI * z.shape[-1]


def ours_step(mlp, x, eps, counter=None, **solver):
    """A zero-argument function: one training step of kr.layers.CNF.

    Returns (loss, nll, forward NFE, backward NFE, counted forward,
    counted backward, *grads); the counts are -1 without a counter.
    """
    import tensorflow as tf

    import keras_rnode as kr

    dynamics = mlp if counter is None else counting(mlp, counter)
    cnf = kr.layers.CNF(dynamics, trace="hutchinson", noise="gaussian", **solver)
    cnf.build(x.shape)
    cnf._noise = lambda z: eps  # the same probe as TFP's, every step  # noqa: SLF001
    variables = mlp.trainable_variables

    def step():
        if counter is not None:
            counter.assign(0)
        with tf.GradientTape() as tape:
            z, delta_logp, penalties = cnf(x, training=True, regularize=True)
            kinetic, jacobian = penalties["kinetic"], penalties["jacobian"]
            nll = -tf.reduce_mean(std_normal_log_prob(z) - delta_logp)
            loss = nll + LAMBDA * tf.reduce_mean(kinetic) + LAMBDA * tf.reduce_mean(jacobian)
        forward = _count_after(counter, [loss])
        grads = tape.gradient(loss, variables)
        total = _count_after(counter, grads)
        return (loss, nll, cnf.stats["nfe"].value, cnf.stats["backward_nfe"].value,
                forward, total - forward, *grads)
    return step


def tfp_step(mlp, x, eps, tol, counter=None):
    """One training step of tfp.bijectors.FFJORD; outputs as `ours_step` (no regularizers)."""
    import tensorflow as tf
    import tensorflow_probability as tfp

    net = mlp if counter is None else counting(mlp, counter)

    def g(t, z):  # FFJORD's inverse runs -g(1 - t, z) forward in time: that is f(t, z)
        return -net(1.0 - t, z)

    trace = functools.partial(tfp.bijectors.ffjord.trace_jacobian_hutchinson,
                              sample_fn=lambda shape, dtype, seed=None: eps[None])
    variables = mlp.trainable_variables
    minus_one = tf.constant(-1, tf.int32)

    def step():
        if counter is not None:
            counter.assign(0)
        # Built per trace: the bijector caches tensors of the graph it ran in.
        ffjord = tfp.bijectors.FFJORD(
            g, ode_solve_fn=tfp.math.ode.DormandPrince(rtol=tol, atol=tol).solve,
            trace_augmentation_fn=trace)
        dist = tfp.distributions.TransformedDistribution(
            tfp.distributions.MultivariateNormalDiag(tf.zeros(x.shape[-1])), ffjord)
        with tf.GradientTape() as tape:
            nll = -tf.reduce_mean(dist.log_prob(x))
        forward = _count_after(counter, [nll])
        grads = tape.gradient(nll, variables)
        total = _count_after(counter, grads)
        return (nll, nll, minus_one, minus_one, forward, total - forward, *grads)
    return step


def _count_after(counter, tensors):
    """The counter's value once `tensors` are computed; -1 without a counter.

    Stateful ops in a tf.function run in program order, so a read placed
    between the loss and tape.gradient sees the forward solve's count only.
    """
    import tensorflow as tf

    if counter is None:
        return tf.constant(-1, tf.int64)
    with tf.control_dependencies([t for t in tensors if t is not None]):
        return counter.read_value()


def build_variants(mlp, x, eps, tol, max_steps, include_tfp_xla):
    import tensorflow as tf

    counter = make_counter()
    solver = dict(method="dopri5", rtol=tol, atol=tol, max_steps=max_steps, gradient="adjoint")
    variants = {
        ("ours", "graph"): tf.function(ours_step(mlp, x, eps, counter, **solver)),
        ("ours", "xla"): tf.function(ours_step(mlp, x, eps, **solver), jit_compile=True),
        ("tfp", "graph"): tf.function(tfp_step(mlp, x, eps, tol, counter)),
    }
    if include_tfp_xla:
        variants[("tfp", "xla")] = tf.function(tfp_step(mlp, x, eps, tol), jit_compile=True)
    return variants


# --------------------------------------------------------------------------
# adjoint vs direct as the number of steps grows: one subprocess per n


def peak_memory_step(fn):
    """Bytes by which one call of fn raises the peak memory above what was in use before."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        tf.config.experimental.reset_memory_stats("GPU:0")
        before = tf.config.experimental.get_memory_info("GPU:0")["current"]
        run_once(fn)
        return tf.config.experimental.get_memory_info("GPU:0")["peak"] - before
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _proc_status("VmRSS")
    run_once(fn)
    return _proc_status("VmHWM") - before


def _proc_status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_scaling(n, batch, seed, weight_scale, repeats, mode):
    """Time and peak memory of one step with rk4, step 1/n, adjoint and direct (JSON)."""
    import tensorflow as tf

    mlp, x, eps = make_problem(batch, seed, weight_scale)
    variants = {}
    for gradient in ("adjoint", "direct"):
        # max_steps = n: inside a tf.function the fixed-step count is not a static
        # value, so the direct gradient's record is sized max_steps (see the report).
        step = ours_step(mlp, x, eps, method="rk4", step_size=1.0 / n, max_steps=n,
                         gradient=gradient)
        variants[gradient] = tf.function(step, jit_compile=(mode == "xla"))
    compiled, failures, compile_s = compile_all(variants)
    memory = {g: max(peak_memory_step(fn) for _ in range(2)) for g, fn in compiled.items()}
    timings = time_interleaved(compiled, repeats, seed)
    # The direct gradient records no backward statistics: it re-evaluates every step once.
    nfe = {g: [int(v) for v in fn()[2:4]] if g == "adjoint" else [int(fn()[2]), "-"]
           for g, fn in compiled.items()}
    return {
        "n": n, "failures": failures, "compile_s": compile_s, "memory": memory, "nfe": nfe,
        "wall": {g: timings.get(g) for g in compiled},
        "cpu": {g: timings.get(g, "cpu") for g in compiled},
    }


def run_scaling(steps, batch, seed, weight_scale, repeats, threads, mode):
    """One fresh subprocess per n (see the module docstring); returns their JSON results."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    results = []
    for n in steps:
        click.echo(f"  rk4, {n} steps ...", err=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--scaling-worker", str(n),
               "--batch", str(batch), "--seed", str(seed), "--weight-scale", str(weight_scale),
               "--scaling-repeats", str(repeats), "--threads", str(threads),
               "--scaling-mode", mode]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            results.append({"n": n, "error": f"exit {proc.returncode}: {tail[0][:200]}"})
            continue
        results.append(json.loads(lines[-1]))
    return results


# --------------------------------------------------------------------------
# Reporting


def report(args, timings, outputs, failures, compile_s, scaling, wall_s):
    def med(key, metric="wall"):
        return timings.get(key, metric)

    # NFE: ours from its own statistics in each mode; TFP's from the counter (graph mode).
    nfe = {}
    for key, out in outputs.items():
        if key[0] == "ours":
            nfe[key] = (int(out[2]), int(out[3]))
        elif int(out[4]) >= 0:
            nfe[key] = (int(out[4]), int(out[5]))
    if ("tfp", "xla") in outputs and ("tfp", "graph") in nfe:
        nfe[("tfp", "xla")] = nfe[("tfp", "graph")]

    def per_eval(key, metric="wall"):
        if key not in nfe or med(key, metric) is None:
            return None
        return med(key, metric) / sum(nfe[key])

    lines = section_head(HEADING, args["command"], "keras", "tensorflow-probability")
    add = lines.append
    add(f"- Problem: ConcatSquashMLP 3 x 64 softplus on 2-D `toy('8gaussians')`, batch "
        f"{args['batch']}, float32; Glorot kernels x {args['weight_scale']:g}, last layer not "
        f"zeroed (fixed weights, the same for both); Hutchinson trace, one fixed Gaussian probe "
        f"shared by both; dopri5 rtol = atol = {args['tol']:g}; adjoint gradients w.r.t. the "
        f"{args['n_vars']} weight tensors. Ours: `kr.layers.CNF`, loss = mean(-log p) + "
        f"{LAMBDA} kinetic + {LAMBDA} jacobian (4 states integrated, 2 under error control). "
        f"TFP: `tfp.bijectors.FFJORD` (trace_jacobian_hutchinson, "
        f"tfp.math.ode.DormandPrince with its default adjoint), loss = mean(-log p).")
    add(f"- Timing: {args['repeats']} interleaved rounds (order shuffled each round) in one "
        f"process, TensorFlow threads: {args['threads']}; medians of wall time (min in "
        f"brackets) and of the process's CPU time. With one thread the CPU time hardly "
        f"depends on the neighbours' load on this shared machine: the steadier ratios. "
        f"Whole run {wall_s:.0f} s.")
    add("")
    add("### 1. Ours vs tfp.bijectors.FFJORD, one training step")
    add("")
    nll = {k: float(v[1]) for k, v in outputs.items()}
    add("NFE: evaluations of the dynamics net per step (forward solve / backward solve; the "
        "backward evaluation is a vector-Jacobian product of the augmented dynamics, about 2-3x "
        "a forward one). Per evaluation: step time / (forward + backward NFE). Graph-mode "
        "variants carry the counting wrapper. NLL at these weights: " + ", ".join(
            f"{k[0]} {k[1]} {v:.5f}" for k, v in nll.items()) + ".")
    add("")
    add("| impl | mode | NFE fwd | NFE bwd | step wall [ms] | step CPU [ms] "
        "| per eval wall | per eval CPU | tfp / ours per eval (wall) | tfp / ours per eval (CPU) "
        "| tfp / ours per step (CPU) |")
    add("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode in ("graph", "xla"):
        for impl in ("ours", "tfp"):
            key = (impl, mode)
            if key in failures:
                add(f"| {impl} | {mode} | - | - | failed | - | - | - | - | - | - |")
                continue
            if key not in timings:
                add(f"| {impl} | {mode} | - | - | not run | - | - | - | - | - | - |")
                continue
            f, b = nfe.get(key, ("-", "-"))
            other = ("tfp", mode)
            rel = [fmt_ratio(ratio(per_eval(other, m), per_eval(key, m))) for m in ("wall", "cpu")]
            step_rel = fmt_ratio(ratio(med(other, "cpu"), med(key, "cpu")))
            add(f"| {impl} | {mode} | {f} | {b} | {fmt_ms(med(key))} "
                f"({fmt_ms(timings.minimum(key))}) | {fmt_ms(med(key, 'cpu'))} "
                f"| {fmt_us(per_eval(key))} | {fmt_us(per_eval(key, 'cpu'))} | {rel[0]} "
                f"| {rel[1]} | {step_rel} |")
    add("")
    counted = outputs.get(("ours", "graph"))
    if counted is not None and int(counted[4]) >= 0:
        add(f"- Check: the counting wrapper saw {int(counted[4])} / {int(counted[5])} "
            f"evaluations of ours (graph mode), its statistics say {int(counted[2])} / "
            f"{int(counted[3])}.")
    if ("tfp", "xla") in outputs:
        add("- TFP's NFE under XLA are taken from its graph-mode count (the same computation).")
    for key, why in failures.items():
        add(f"- {' / '.join(key)} failed: `{why}`")
    add("")
    add("Goal: ours >= 2x faster per function evaluation (although ours also integrates the "
        "two regularizer states). Ours under XLA against TFP, per evaluation and per step, "
        "wall / CPU:")
    add("")
    ours_x = ("ours", "xla")
    for mode in ("xla", "graph"):
        other = ("tfp", mode)
        if other not in timings or ours_x not in timings:
            continue
        pe = [fmt_ratio(ratio(per_eval(other, m), per_eval(ours_x, m))) for m in ("wall", "cpu")]
        ps = [fmt_ratio(ratio(med(other, m), med(ours_x, m))) for m in ("wall", "cpu")]
        add(f"- vs TFP {mode}: per evaluation {pe[0]}x / {pe[1]}x; per step {ps[0]}x / {ps[1]}x")
    add("")

    add("### 2. XLA vs graph mode")
    add("")
    add("| impl | graph CPU [ms] | xla CPU [ms] | graph / xla (wall) | graph / xla (CPU) |")
    add("|---|---:|---:|---:|---:|")
    for impl in ("ours", "tfp"):
        g, x = (impl, "graph"), (impl, "xla")
        add(f"| {impl} | {fmt_ms(med(g, 'cpu'))} | {fmt_ms(med(x, 'cpu'))} "
            f"| {fmt_ratio(ratio(med(g), med(x)))} | {fmt_ratio(ratio(med(g, 'cpu'), med(x, 'cpu')))} |")
    add("")
    add("First call (trace + compile + one run) [s]: " + ", ".join(
        f"{' / '.join(k)} {v:.1f}" for k, v in compile_s.items()) + ".")
    add("")

    if scaling:
        add_scaling(add, args, scaling)
    return "\n".join(lines)


def add_scaling(add, args, scaling):
    mode = args["scaling_mode"]
    add("### 3. gradient=\"adjoint\" vs \"direct\" as the number of steps grows")
    add("")
    rec = 4 * (2 + args["batch"] * (2 + 3))  # (s, h) and z, delta_logp, kinetic, jacobian
    add(f"Ours, {'XLA' if mode == 'xla' else 'graph mode'}, the same step with method=\"rk4\", "
        f"step_size = 1/n (n steps, 4n evaluations each way). Each n runs in a fresh "
        f"subprocess ({args['scaling_repeats']} interleaved rounds of the two gradients there). "
        f"Peak memory of a step: on the CPU the rise of the process's peak RSS during one call "
        f"above the RSS before it (mmap threshold fixed at 64 KiB so that freed buffers leave "
        f"the RSS; the kernel's peak mark reset before the call); the larger of two calls. "
        f"The direct gradient keeps the state at the start of every step: {rec / 1024:.1f} KiB "
        f"a step at this batch, in a record sized max_steps, since inside a `tf.function` the "
        f"step count of a fixed-step solve is not a static value; under XLA that whole record "
        f"is allocated whatever the number of steps taken, so here max_steps = n. (With the "
        f"default max_steps = 1000 the direct gradient's record costs "
        f"{1000 * rec / 2**20:.1f} MiB at every n, and an adaptive solve always sizes it so.)")
    add("")
    add("| n steps | NFE fwd / bwd adjoint | NFE fwd / bwd direct | adjoint CPU [ms] "
        "| direct CPU [ms] | direct / adjoint (CPU) | direct / adjoint (wall) "
        "| adjoint peak [MiB] | direct peak [MiB] | direct - adjoint [MiB] |")
    add("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    mib = 1024 * 1024
    for r in scaling:
        if "error" in r:
            add(f"| {r['n']} | failed: {r['error']} | | | | | | | | |")
            continue
        mem, cpu, wall, nfe = r["memory"], r["cpu"], r["wall"], r["nfe"]
        a_mem, d_mem = mem.get("adjoint"), mem.get("direct")
        diff = "-" if a_mem is None or d_mem is None else f"{(d_mem - a_mem) / mib:.1f}"
        add(f"| {r['n']} | {'/'.join(map(str, nfe.get('adjoint', ['-'])))} "
            f"| {'/'.join(map(str, nfe.get('direct', ['-'])))} "
            f"| {fmt_ms(cpu.get('adjoint'))} | {fmt_ms(cpu.get('direct'))} "
            f"| {fmt_ratio(ratio(cpu.get('direct'), cpu.get('adjoint')))} "
            f"| {fmt_ratio(ratio(wall.get('direct'), wall.get('adjoint')))} "
            f"| {_mib(a_mem)} | {_mib(d_mem)} | {diff} |")
    add("")
    ok = [r for r in scaling if "error" not in r and len(r["memory"]) == 2]
    if len(ok) >= 2:
        first, last = ok[0], ok[-1]
        growth = {g: (last["memory"][g] - first["memory"][g]) / mib for g in ("adjoint", "direct")}
        expected = (last["n"] - first["n"]) * rec / mib
        add(f"From n = {first['n']} to {last['n']}: adjoint peak {growth['adjoint']:+.1f} MiB, "
            f"direct {growth['direct']:+.1f} MiB (its stored states alone: "
            f"{expected:+.1f} MiB). Expected: adjoint flat, direct growing with the steps.")
        add("")
    for r in scaling:
        for g, why in (r.get("failures") or {}).items():
            add(f"- n = {r['n']}, {g} failed: `{why}`")


def _mib(b):
    return "-" if b is None else f"{b / (1024 * 1024):.1f}"


# --------------------------------------------------------------------------


def _int_list(ctx, param, value):
    if value is None:
        return None
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter("a comma-separated list of integers, e.g. 4,16,64") from None
    if not out or min(out) < 1:
        raise click.BadParameter("a comma-separated list of positive integers")
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--repeats", type=click.IntRange(1), default=None,
              help="Interleaved timing rounds of the main comparison (default 10; 2 with --quick).")
@click.option("--batch", type=click.IntRange(1), default=None,
              help="Batch of 2-D points (default 512; 32 with --quick).")
@click.option("--tol", type=float, default=1e-5, show_default=True, help="dopri5 rtol = atol.")
@click.option("--weight-scale", type=float, default=4.0, show_default=True,
              help="Factor on the Glorot kernels: larger, stiffer dynamics, more NFE.")
@click.option("--tfp-xla/--no-tfp-xla", default=True, show_default=True,
              help="Also time FFJORD under jit_compile=True (its compile takes about a minute).")
@click.option("--steps", callback=_int_list, default=None,
              help="Comma-separated RK4 step counts n for adjoint vs direct "
                   "(default 4,16,64,256; 2,8 with --quick).")
@click.option("--scaling/--no-scaling", default=True, show_default=True,
              help="Run the adjoint vs direct section.")
@click.option("--scaling-mode", type=click.Choice(["xla", "graph"]), default="xla",
              show_default=True, help="Mode of the adjoint vs direct section.")
@click.option("--scaling-repeats", type=click.IntRange(1), default=None,
              help="Timing rounds per n in that section (default 3; 1 with --quick).")
@common_options(HEADING,
                quick="Smoke run: tiny batch and repeats; results not written unless --results.",
                no_write="Only print the tables.")
@click.option("--scaling-worker", type=int, default=None, hidden=True,
              help="Internal: run one n of the adjoint vs direct section, print JSON.")
def main(repeats, batch, tol, weight_scale, tfp_xla, steps, scaling, scaling_mode,
         scaling_repeats, quick, results, no_write, threads, seed, scaling_worker):
    """Time a CNF training step: kr.layers.CNF against tfp.bijectors.FFJORD (issue 5)."""
    threads_label = set_threads(threads)
    batch = batch or (32 if quick else 512)
    scaling_repeats = scaling_repeats or (1 if quick else 3)
    if scaling_worker is not None:
        click.echo(json.dumps(measure_scaling(
            scaling_worker, batch, seed, weight_scale, scaling_repeats, scaling_mode)))
        return
    started = time.perf_counter()
    repeats = repeats or (2 if quick else 10)
    steps = steps or ([2, 8] if quick else [4, 16, 64, 256])

    mlp, x, eps = make_problem(batch, seed, weight_scale)
    variants = build_variants(mlp, x, eps, tol, max_steps=1000, include_tfp_xla=tfp_xla)
    click.echo(f"compiling {len(variants)} variants ...", err=True)
    compiled, failures, compile_s = compile_all(variants)
    for key, why in failures.items():
        click.echo(f"  {' / '.join(key)}: FAILED {why}", err=True)
    outputs = {key: [o.numpy() for o in fn()] for key, fn in compiled.items()}
    click.echo(f"timing, {repeats} rounds ...", err=True)
    timings = time_interleaved(compiled, repeats, seed)
    scaling_results = []
    if scaling:
        click.echo(f"adjoint vs direct, n = {steps} ...", err=True)
        scaling_results = run_scaling(steps, batch, seed, weight_scale, scaling_repeats,
                                      threads, scaling_mode)

    args = dict(command=command_line(), batch=batch, tol=tol, repeats=repeats,
                weight_scale=weight_scale, n_vars=len(mlp.trainable_variables),
                threads=threads_label, scaling_mode=scaling_mode,
                scaling_repeats=scaling_repeats)
    section = report(args, timings, outputs, failures, compile_s, scaling_results,
                     time.perf_counter() - started)
    publish(section, results, quick, no_write)


if __name__ == "__main__":
    main()
