"""Flow matching against RNODE's likelihood training, and against torchcfm (issue 25).

Every method trains on the same data, in the same batch order, from the
same seed, all in one process, interleaved: the method with the least
training time so far runs its next chunk of steps (up to its next
evaluation), so that a machine shared with other work slows all alike and
every curve advances in training time together. Each method's clock (wall
and process CPU time) counts only its own training steps; its first step
(tracing and XLA compilation) and every evaluation are off the clock.

Methods (2-D data: ConcatSquashMLP 64,64,64, softplus for likelihood and SiLU
for flow matching as `rnode train` picks them, one CNF block, exact
trace; digits: the model `rnode train --dataset digits` builds, dense
256,256 dynamics on the flattened 8x8 image, Hutchinson trace, 17 levels,
logit transform):

- rnode: the likelihood objective as `rnode train` trains it
  (`runs.compiled_model` of `TrainSettings`: lambda_K = lambda_J = 0.01,
  dopri5 at 1e-5, direct gradient, Adam 1e-3 inside SkipBadSteps, batch
  512, `--jit auto`).
- fm: the same model, objective FlowMatching(coupling="independent"),
  TensorFlow with XLA.
- fm_ot: FlowMatching(coupling="ot"); TensorFlow in graph mode, since XLA
  cannot compile the host call of the assignment (JAX can: the step-time
  section times it there too).
- fm_ot_ft: branches off fm_ot at its first evaluation after --switch-share
  of its budget (a copy of its weights, with its clock and steps carried
  on), then `model.objective = "likelihood"`, compile (a fresh Adam 1e-3),
  and likelihood steps with RNODE's penalties to the end of that budget:
  FM-OT then a fine-tune within --fm-share of RNODE's time, all told.
- fm_ot_softplus (a diagnostic): fm_ot on the same ConcatSquashMLP with the
  likelihood's softplus instead of flow matching's default SiLU: the
  network's part in what fm_ot learns per step.
- cfm, otcfm (2-D data, where torchcfm is installed): torchcfm's
  ConditionalFlowMatcher (I-CFM) and ExactOptimalTransportConditionalFlowMatcher
  (OT-CFM; POT's exact plan, pairs drawn from it with replacement, as
  torchcfm does), on torchcfm.models.MLP(dim=2, w=64, time_varying=True)
  (three hidden layers of 64, SELU, t concatenated to x: 8,706 weights
  against ConcatSquashMLP's 9,229), the same sigma, batch and Adam 1e-3,
  PyTorch's default initialization, PyTorch threads set with --threads.
  Their fields are evaluated with this package's solver: the weights are
  copied into the same MLP written in Keras (checked to match PyTorch's to
  1e-5 at the start), with time reversed (f(t, z) = -v(1 - t, z): torchcfm
  runs from noise at 0 to data at 1), so NFE and kinetic energy are
  measured exactly as for ours.

Evaluation, off the clock, at a schedule of steps (every --eval-every-fm
steps for flow matching, 100 for likelihood steps on 2-D data and 25 on the
digits, each gap at least a tenth of the steps so far): the held-out NLL in
nats (2-D, exact trace; --n-test points of toy(name, n, seed + 1)) or
bits/dim (the digits' 360 test images, uniform dequantization, fixed-seed
Hutchinson probes, as `rnode evaluate`), all in one batch with dopri5 at
1e-5; its NFE; and the held-out kinetic energy, `model.penalties(x,
names=["kinetic"])` (0.5 mean f^2 integrated along the flow) on the first
--n-kinetic of them.

Budgets: rnode trains for --budget-s of training time (per data set,
BUDGETS), every other method for --fm-share of it (the goals ask for
at most half of RNODE's time) or --max-fm-steps. Targets: 3.0 nats on
8gaussians, 3.6 on checkerboard, RNODE's final bits/dim on the digits.

A second part times single training steps at batch 512 on 8gaussians,
--repeats interleaved rounds of --chunk steps each, medians of wall and CPU
time: ours with either coupling, on ConcatSquashMLP and on torchcfm's MLP
(the equal-network comparison), in XLA and in graph mode, and under JAX
(jit with a host callback, in a worker process: Keras picks its backend
at import); the same regression in a bare Keras model on either network
(no RNODE around it: the floor Keras and TensorFlow set); torchcfm's I-CFM
and OT-CFM; RNODE's likelihood step; and the OT coupling alone on each data set (ours: scipy's linear_sum_assignment;
torchcfm's: POT's exact plan and its sampling).

Records: benchmarks/results/flow_matching_<dataset>.jsonl (a config line,
one line per evaluation, a summary line), flow_matching_steps.jsonl, the
figure benchmarks/results/flow_matching.png; the section "## Flow matching
(issue 25)" of RESULTS.md.

The environment (torchcfm and POT stay out of the project's own):

    python3.11 -m venv /work/venvs/fmbench && . /work/venvs/fmbench/bin/activate
    pip install torch==2.13.0             # the CPU wheel (a bare `torch` pulls CUDA)
    pip install keras==3.15.1 tensorflow==2.21.0 tensorflow-probability==0.25.0 \\
        tf-keras==2.21.0 scipy click scikit-learn matplotlib "jax[cpu]==0.10.2"
    pip install torchcfm==1.0.7 --no-deps # its package imports only torch, numpy and POT:
    pip install pot                       # torchdyn, torchdiffeq, pandas, absl: not needed
    PYTHONPATH=. python benchmarks/flow_matching.py    # about 45 min on 2 quiet cores

(That venv also ran `bash benchmarks/gpu.sh --cpu --quick`, with `pip install
diffrax torchdiffeq` added.) Without torchcfm the script runs the rest and
says so. `--quick` is a smoke run of a minute or two (8gaussians, a few
steps of each method, graph mode, into a temporary folder).
"""

import dataclasses
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# POT (torchcfm's OT) would otherwise start JAX and TensorFlow backends of its own in
# this process, beside the ones being timed; torchcfm hands it NumPy arrays.
os.environ.setdefault("POT_BACKEND_DISABLE_JAX", "1")
os.environ.setdefault("POT_BACKEND_DISABLE_TENSORFLOW", "1")

import click  # noqa: E402
import numpy as np  # noqa: E402
from _timing import (  # noqa: E402  (makes TensorFlow the backend)
    clocked_step,
    command_line,
    common_options,
    machine,
    publish,
    save_figure,
    set_threads,
)
from plateau import batches  # noqa: E402

HEADING = "## Flow matching (issue 25)"
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"
TARGETS = {"8gaussians": 3.0, "checkerboard": 3.6}  # the digits: RNODE's final bits/dim
# RNODE's training budget per data set, seconds; the others get --fm-share of it.
BUDGETS = {"8gaussians": 150.0, "checkerboard": 200.0, "digits": 240.0}
METHODS = ("rnode", "fm", "fm_ot", "fm_ot_ft", "fm_ot_softplus", "cfm", "otcfm")
TORCHCFM = ("cfm", "otcfm")
LABELS = {"rnode": "RNODE (likelihood)", "fm": "FM, independent", "fm_ot": "FM-OT",
          "fm_ot_ft": "FM-OT + likelihood fine-tune", "fm_ot_softplus": "FM-OT, softplus net",
          "cfm": "torchcfm I-CFM", "otcfm": "torchcfm OT-CFM"}
COLORS = {"rnode": "tab:blue", "fm": "tab:green", "fm_ot": "tab:red", "fm_ot_ft": "tab:purple",
          "fm_ot_softplus": "tab:pink", "cfm": "tab:olive", "otcfm": "tab:orange"}
BATCH = 512
LR = 1e-3
WIDTH = 64  # torchcfm's MLP, as wide as our hidden layers


# --------------------------------------------------------------------------
# Data


def load(dataset, n_train, n_test, seed):
    """(x_train float32, x_test float32, levels or None)."""
    import keras_rnode as kr

    if dataset == "digits":
        (x_train, _), (x_test, _) = kr.datasets.digits()
        return (x_train.astype(np.float32), x_test.astype(np.float32),
                kr.datasets.DIGITS_LEVELS)
    return (kr.datasets.toy(dataset, n_train, seed=seed),
            kr.datasets.toy(dataset, n_test, seed=seed + 1), None)


def settings_for(dataset, seed):
    """`rnode train --dataset DATASET --seed SEED`'s settings, resolved for the data."""
    import keras_rnode as kr

    shape = (8, 8, 1) if dataset == "digits" else (2,)
    return kr.TrainSettings(dataset=dataset, seed=seed).resolved(shape), shape


# --------------------------------------------------------------------------
# torchcfm's network, in Keras, for evaluating its field with our solver


def torchcfm_field_class():
    import keras
    from keras import ops

    class TorchcfmField(keras.layers.Layer):
        """torchcfm.models.MLP(dim, w, time_varying=True) in Keras, time reversed:
        f(t, z) = -v(1 - t, z), v the MLP of [z, t] (torchcfm's noise is at t = 0)."""

        def __init__(self, dim=2, width=WIDTH, **kwargs):
            super().__init__(**kwargs)
            self.layers_ = [keras.layers.Dense(width, activation="selu") for _ in range(3)]
            self.layers_.append(keras.layers.Dense(dim))

        def build(self, t_shape=None, z_shape=None):
            width = z_shape[-1] + 1
            for layer in self.layers_:
                layer.build((None, width))
                width = layer.units

        def call(self, t, z):
            t = ops.cast(ops.reshape(t, (-1, 1)), z.dtype)
            h = ops.concatenate([z, ops.broadcast_to(1.0 - t, (ops.shape(z)[0], 1))], axis=-1)
            for layer in self.layers_:
                h = layer(h)
            return -h

        def load(self, mlp):
            """Copy the weights of a torchcfm MLP (torch Linear keeps (out, in) kernels)."""
            import torch

            linears = [m for m in mlp.net if isinstance(m, torch.nn.Linear)]
            for layer, linear in zip(self.layers_, linears, strict=True):
                layer.kernel.assign(linear.weight.detach().numpy().T)
                layer.bias.assign(linear.bias.detach().numpy())

    return TorchcfmField


def check_port(field, mlp, seed):
    """Raise unless the Keras port computes torchcfm's MLP (time reversed) to 1e-5."""
    import torch
    from keras import ops

    rng = np.random.default_rng(seed)
    z = rng.normal(size=(64, 2)).astype(np.float32)
    t = rng.uniform(size=64).astype(np.float32)
    field.load(mlp)
    ours = ops.convert_to_numpy(field(ops.convert_to_tensor(t), ops.convert_to_tensor(z)))
    with torch.no_grad():
        theirs = -mlp(torch.cat([torch.from_numpy(z), torch.from_numpy(1 - t)[:, None]], -1))
    gap = float(np.max(np.abs(ours - theirs.numpy())))
    if not gap <= 1e-5:
        raise RuntimeError(f"the Keras port of torchcfm's MLP is off by {gap:g}")
    return gap


def have_torchcfm():
    try:
        import torchcfm  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------
# The methods: a step and an evaluation each


class Evaluator:
    """Held-out NLL (nats) or bits/dim, evaluation NFE and kinetic energy of a model."""

    def __init__(self, model, x_test, n_kinetic):
        from keras_rnode import backend

        self.model, self.x_test = model, x_test
        self.x_kinetic = x_test[:n_kinetic]
        self.kinetic = backend.inference_function(
            model, lambda x: model.penalties(x, names=["kinetic"])["kinetic"])

    def __call__(self):
        from keras import ops

        from keras_rnode.evaluation import log_prob_batches
        from keras_rnode.layers.transforms import bits_per_dim

        start = time.perf_counter()
        model = self.model
        log_p, nfe, status = log_prob_batches(model, self.x_test, len(self.x_test),
                                              strict=False)
        value = (float(np.mean(bits_per_dim(log_p, math.prod(model.event_shape), model.levels)))
                 if model.levels else float(-np.mean(log_p)))
        kinetic = float(np.mean(ops.convert_to_numpy(self.kinetic(self.x_kinetic))))
        return {"nll": value, "eval_nfe": nfe, "status": status, "kinetic": kinetic,
                "eval_s": round(time.perf_counter() - start, 3)}


def optimizer():
    import keras

    from keras_rnode.optimizers import SkipBadSteps

    return SkipBadSteps(keras.optimizers.Adam(LR))


class Ours:
    """A keras-rnode model trained by train_on_batch."""

    def __init__(self, model, x_test, n_kinetic):
        self.model = model
        self.evaluate = Evaluator(model, x_test, n_kinetic)

    def step(self, batch):
        return self.model.train_on_batch(batch, return_dict=True)


def our_model(method, settings, shape, levels, sigma):
    """rnode as `rnode train` compiles it; fm and fm_ot the same model (the same weights,
    from the same seed) with a flow matching objective, and the dynamics' activation
    `rnode train --objective flow-matching` gives them (SiLU); fm_ot_softplus keeps
    the likelihood's softplus."""
    import dataclasses

    import keras

    from keras_rnode import objectives, runs
    from keras_rnode.models.factory import default_activation

    keras.utils.set_random_seed(settings.seed)
    if method != "rnode":
        activation = ("softplus" if method == "fm_ot_softplus"
                      else default_activation(objectives.FlowMatching.name))
        settings = dataclasses.replace(settings, activation=activation)
    model = runs.compiled_model(settings, shape, levels)
    model.build((None, *shape))
    if method == "rnode":
        return model
    coupling = "independent" if method == "fm" else "ot"
    model.objective = objectives.FlowMatching(coupling=coupling, sigma=sigma)
    # XLA cannot compile the OT step's host call on TensorFlow: graph mode there.
    model.compile(optimizer=optimizer(), jit_compile=settings.jit and coupling != "ot")
    return model


def finetune_from(fm_ot_model, settings, shape, levels, sigma):
    """A copy of an FM-OT model switched to the likelihood objective and compiled, as a
    user fine-tunes: `model.objective = "likelihood"`, compile, fit."""
    model = our_model("fm_ot", settings, shape, levels, sigma)
    model.set_weights(fm_ot_model.get_weights())
    model.objective = "likelihood"
    model.compile(optimizer=optimizer(), jit_compile=settings.jit)
    return model


class Torchcfm:
    """torchcfm's matcher and MLP, trained with Adam; evaluated through the Keras port."""

    def __init__(self, method, seed, sigma, x_test, n_kinetic, port):
        import torch
        import torchcfm
        from torchcfm.models import MLP

        torch.manual_seed(seed)
        np.random.seed(seed)  # OT-CFM draws its pairs from the plan with NumPy's global RNG
        matcher = (torchcfm.ExactOptimalTransportConditionalFlowMatcher if method == "otcfm"
                   else torchcfm.ConditionalFlowMatcher)
        self.matcher = matcher(sigma=sigma)
        self.net = MLP(dim=2, w=WIDTH, time_varying=True)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=LR)
        self.port = port
        self.port_gap = check_port(port.blocks[0].dynamics, self.net, seed)
        self._evaluate = Evaluator(port, x_test, n_kinetic)

    def step(self, batch):
        import torch

        x1 = torch.from_numpy(batch)
        x0 = torch.randn_like(x1)
        t, xt, ut = self.matcher.sample_location_and_conditional_flow(x0, x1)
        loss = torch.mean((self.net(torch.cat([xt, t[:, None]], dim=-1)) - ut) ** 2)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"loss": loss.item()}

    def evaluate(self):
        self.port.blocks[0].dynamics.load(self.net)
        return self._evaluate()


def port_model(seed):
    """An RNODE around the Keras port of torchcfm's MLP, evaluated as ours are."""
    import keras

    import keras_rnode as kr
    from keras_rnode.solvers.settings import SolverSettings

    keras.utils.set_random_seed(seed)
    solver = SolverSettings(gradient="direct")
    cnf = kr.layers.CNF(torchcfm_field_class()(), trace="exact", solver=solver,
                        eval_solver=solver, seed=seed)
    model = kr.RNODE([cnf])
    model.build((None, 2))
    return model


# --------------------------------------------------------------------------
# The interleaved race


def next_eval(step, every):
    """The step of the next evaluation: `every` steps on, or a tenth of the steps so far
    (rounded down to a multiple of `every`) where that is more."""
    return step + max(every, every * int(0.1 * step / every))


class Run:
    """One method's training: its batches, clocks, per-step times and records."""

    def __init__(self, name, method, data, every, budget, max_steps, clock):
        self.name, self.method, self.data, self.every = name, method, data, every
        self.budget, self.max_steps, self.clock_name = budget, max_steps, clock
        self.steps = 0
        self.wall = self.cpu = 0.0
        self.compile_s = None
        self.window, self.records, self.step_wall, self.step_cpu = [], [], [], []
        self.failed = None

    def clock(self):
        return self.cpu if self.clock_name == "cpu" else self.wall

    def done(self):
        return bool(self.failed) or self.steps >= self.max_steps or self.clock() >= self.budget

    def step(self):
        wall, cpu, first = self.wall, self.cpu, self.compile_s is None
        clocked_step(self, self.method.step, next(self.data))
        if not first:
            self.step_wall.append(self.wall - wall)
            self.step_cpu.append(self.cpu - cpu)

    def chunk(self):
        """Train up to the next evaluation (or the budget), then evaluate."""
        target = min(next_eval(self.steps, self.every), self.max_steps)
        while self.steps < target and not self.failed and self.clock() < self.budget:
            self.step()
        return self.record()

    def record(self):
        losses = [float(w["loss"]) for w in self.window]
        self.window = []
        row = {"method": self.name, "step": self.steps, "wall_s": round(self.wall, 3),
               "cpu_s": round(self.cpu, 3), "loss": float(np.mean(losses)) if losses else None,
               **self.method.evaluate()}
        self.records.append(row)
        return row


def race(dataset, args, log):
    """Train every method on `dataset`, interleaved by training time; returns {name: Run}."""
    x_train, x_test, levels = load(dataset, args["n_train"], args["n_test"], args["seed"])
    settings, shape = settings_for(dataset, args["seed"])
    if args["quick"]:  # graph mode compiles in half the time: a smoke run's choice
        settings = dataclasses.replace(settings, jit=False)
    names = [m for m in args["methods"] if not (levels and m in TORCHCFM)]
    budget = args["budgets"][dataset]
    fm_budget = args["fm_share"] * budget
    switch = args["switch_share"] * fm_budget
    likelihood_every = args["likelihood_every"] or (25 if levels else 100)
    runs = {}

    def start(name, method, every, run_budget, max_steps):
        runs[name] = Run(name, method, batches(x_train, BATCH, args["seed"]), every,
                         run_budget, max_steps, args["clock"])
        return runs[name]

    for name in names:
        if name == "fm_ot_ft":
            continue
        if name in TORCHCFM:
            method = Torchcfm(name, args["seed"], args["sigma"], x_test, args["n_kinetic"],
                              port_model(args["seed"]))
        else:
            method = Ours(our_model(name, settings, shape, levels, args["sigma"]), x_test,
                          args["n_kinetic"])
        rnode = name == "rnode"
        run = start(name, method, likelihood_every if rnode else args["eval_every_fm"],
                    budget if rnode else fm_budget,
                    math.inf if rnode else args["max_fm_steps"])
        log(run.record())  # the initial model, step 0
    order = {name: i for i, name in enumerate(METHODS)}
    while True:
        active = [r for r in runs.values() if not r.done()]
        if not active:
            break
        run = min(active, key=lambda r: (r.clock(), order[r.name]))
        log(run.chunk())
        if run.name == "fm_ot" and run.clock() >= switch and "fm_ot_ft" in names \
                and "fm_ot_ft" not in runs:
            ft = start("fm_ot_ft", Ours(finetune_from(run.method.model, settings, shape, levels,
                                                      args["sigma"]), x_test, args["n_kinetic"]),
                       max(likelihood_every // 2, 1), fm_budget, math.inf)
            # The fine-tune's clock starts where FM-OT's stood, and FM-OT's curve so far is
            # its own: its times are from scratch.
            ft.steps, ft.wall, ft.cpu = run.steps, run.wall, run.cpu
            ft.records = [dict(r, method="fm_ot_ft", inherited=True) for r in run.records]
            for row in ft.records:
                log(row)
    return runs, levels


# --------------------------------------------------------------------------
# Summary


def first_reaching(records, target, clock):
    """The first record at or below the target, or None."""
    return next((r for r in records if r["nll"] <= target), None)


def at_budget(records, budget, clock):
    """The last record whose training time is within the budget."""
    within = [r for r in records if r[f"{clock}_s"] <= budget]
    return within[-1] if within else records[0]


def summarize(dataset, runs, levels, args):
    clock = args["clock"]
    budget = args["budgets"][dataset]
    fixed = args["fm_share"] * budget
    target = (runs["rnode"].records[-1]["nll"] if levels and "rnode" in runs
              else TARGETS.get(dataset, math.nan))
    out = {"dataset": dataset, "unit": "bits/dim" if levels else "nats", "target": target,
           "budget_s": budget, "fixed_budget_s": fixed, "clock": clock, "methods": {}}
    for name, run in runs.items():
        reached = first_reaching(run.records, target, clock)
        last = run.records[-1]
        out["methods"][name] = {
            "steps": run.steps, "failed": run.failed, "compile_s": run.compile_s,
            "wall_s": run.wall, "cpu_s": run.cpu,
            "ms_step_wall": 1e3 * statistics.median(run.step_wall) if run.step_wall else None,
            "ms_step_cpu": 1e3 * statistics.median(run.step_cpu) if run.step_cpu else None,
            "target_step": reached and reached["step"],
            "target_wall_s": reached and reached["wall_s"],
            "target_cpu_s": reached and reached["cpu_s"],
            "target_eval_nfe": reached and reached["eval_nfe"],
            "nll_at_budget": at_budget(run.records, fixed, clock)["nll"],
            "final_nll": last["nll"], "best_nll": min(r["nll"] for r in run.records),
            "final_eval_nfe": last["eval_nfe"], "final_kinetic": last["kinetic"],
            "final_status": last["status"],
        }
    out["goals"] = goals(out, runs, clock)
    # What the network does to FM-OT's learning per step, at equal steps.
    pair = paired(runs, "fm_ot_softplus", "fm_ot")
    if pair is not None:
        out["activation"] = {"step": pair[0]["step"], "softplus": pair[0]["nll"],
                             "silu": pair[1]["nll"], "softplus_nfe": pair[0]["eval_nfe"],
                             "silu_nfe": pair[1]["eval_nfe"]}
    return out


def paired(runs, a, b):
    """The records of methods a and b at the last step both evaluated (None if none)."""
    if a not in runs or b not in runs:
        return None
    steps = {r["step"]: r for r in runs[b].records}
    shared = [r for r in runs[a].records if r["step"] in steps and r["step"] > 0]
    return (shared[-1], steps[shared[-1]["step"]]) if shared else None


def time_ratio(method, rnode, clock):
    """(ratio, bound): method's time to target over RNODE's. Where RNODE never reached it,
    over RNODE's whole training time: then the true ratio is below the figure (bound)."""
    t = method and method[f"target_{clock}_s"]
    if t is None:
        return None, False
    if rnode[f"target_{clock}_s"] is not None:
        return t / max(rnode[f"target_{clock}_s"], 1e-9), False
    return t / max(rnode[f"{clock}_s"], 1e-9), True


def goals(summary, runs, clock):
    """Each goal of issue 25 on this data set: {name: {met, text}}."""
    m = summary["methods"]
    out = {}
    if "rnode" not in m:
        return out
    rnode = m["rnode"]

    def verdict(ratio, bound, limit):
        if ratio is None:
            return False, "target not reached"
        sign = "< " if bound else ""
        return ratio <= limit, f"{sign}{ratio:.2f}x RNODE's time" + (
            " (RNODE never reached the target: against its whole budget)" if bound else "")

    if summary["dataset"] == "8gaussians" and "fm_ot" in m:
        met, text = verdict(*time_ratio(m["fm_ot"], rnode, clock), 0.1)
        out["fm_ot_tenth"] = {"met": met, "text": f"FM-OT alone to target: {text} (goal 0.1x)"}
    candidates = [(name, *time_ratio(m[name], rnode, clock)) for name in ("fm_ot", "fm_ot_ft")
                  if name in m]
    reached = [c for c in candidates if c[1] is not None]
    if candidates:
        if reached:
            name, ratio, bound = min(reached, key=lambda c: c[1])
            met, text = verdict(ratio, bound, 0.25)
            text = f"{LABELS[name]}: {text}"
        else:
            met, text = False, "neither FM-OT nor its fine-tune reached the target"
        out["fm_ot_quarter"] = {"met": met, "text": f"{text} (goal 0.25x)"}
    for a, b, who in (("fm_ot", "fm", "ours"), ("otcfm", "cfm", "torchcfm")):
        pair = paired(runs, a, b)
        if pair is None:
            continue
        ot, ind = pair
        met = ot["eval_nfe"] < ind["eval_nfe"] and ot["kinetic"] < ind["kinetic"]
        out[f"ot_straighter_{who}"] = {
            "met": met, "text": f"{who}, step {ot['step']}: OT eval NFE {ot['eval_nfe']:.0f} "
            f"against independent {ind['eval_nfe']:.0f}, kinetic {ot['kinetic']:.3f} against "
            f"{ind['kinetic']:.3f}"}
    ft = m.get("fm_ot_ft")
    if ft is not None:
        ratio, bound = time_ratio(ft, rnode, clock)
        nfe_ratio = ft["final_eval_nfe"] / max(rnode["final_eval_nfe"], 1e-9)
        ok_nll = ft["final_nll"] <= summary["target"]
        met = ok_nll and nfe_ratio <= 1.2 and ratio is not None and ratio <= 0.5
        out["finetune"] = {
            "met": met, "text": f"fine-tune ends at {ft['final_nll']:.3f} (target "
            f"{summary['target']:.3f}), eval NFE {nfe_ratio:.2f}x RNODE's (goal 1.2x), "
            f"reached the target in " + ("-" if ratio is None else
                                         f"{'< ' if bound else ''}{ratio:.2f}x") +
            " RNODE's time (goal 0.5x)"}
    return out


# --------------------------------------------------------------------------
# Step times


def bare_flow_matching_class():
    import keras
    from keras import ops

    from keras_rnode import objectives

    class BareFlowMatching(keras.Model):
        """Independent-coupling flow matching on a dynamics net, and nothing else."""

        def __init__(self, dynamics, sigma, seed):
            super().__init__()
            self.dynamics, self.sigma = dynamics, sigma
            self.seed_generator = keras.random.SeedGenerator(seed)

        def call(self, x):
            return x

        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            seed = self.seed_generator
            z = keras.random.normal(ops.shape(x), seed=seed)
            t = keras.random.uniform(ops.shape(x)[:1], seed=seed)
            z_t, u = objectives.straight_path(x, z, t, 1.0, self.sigma,
                                              keras.random.normal(ops.shape(x), seed=seed))
            return ops.mean(objectives.regression_loss(self.dynamics(t, z_t), u))

    return BareFlowMatching


def step_variants(args, jax_worker):
    """{name: callable(chunk) -> (wall s, CPU s) per step}: every step timed at batch 512."""
    import keras

    import keras_rnode as kr
    from keras_rnode import objectives

    x = kr.datasets.toy("8gaussians", 100_000, seed=args["seed"])
    data = batches(x, BATCH, args["seed"])
    pool = [next(data) for _ in range(64)]
    cycle = {"i": 0}

    def batch():
        cycle["i"] += 1
        return pool[cycle["i"] % len(pool)]

    def timed(step):
        def run(chunk):
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(chunk):
                step()
            return ((time.perf_counter() - wall) / chunk, (time.process_time() - cpu) / chunk)
        return run

    variants = {}
    settings, shape = settings_for("8gaussians", args["seed"])

    def seeded_net(net):
        keras.utils.set_random_seed(args["seed"])
        return (kr.layers.ConcatSquashMLP(hidden=(64, 64, 64), activation="silu")
                if net == "concatsquash" else torchcfm_field_class()())

    def ours(coupling, net, jit):
        model = kr.RNODE([kr.layers.CNF(seeded_net(net), trace="exact")],
                         objective=objectives.FlowMatching(coupling=coupling, sigma=args["sigma"]))
        model.build((None, 2))
        model.compile(optimizer=optimizer(), jit_compile=jit)
        return timed(lambda: model.train_on_batch(batch(), return_dict=True))

    def bare(net):
        # The floor under our step: the same regression in a bare Keras model
        # (no RNODE: no stats, trackers, checks), Keras's and TensorFlow's own cost.
        model = bare_flow_matching_class()(seeded_net(net), args["sigma"], args["seed"])
        model(batch())
        model.compile(optimizer=keras.optimizers.Adam(LR), jit_compile=True)
        return timed(lambda: model.train_on_batch(batch(), return_dict=True))

    quick = args["quick"]
    if not quick:
        for net in ("concatsquash", "torchcfm-mlp"):
            variants[f"bare Keras model, the same regression, {net}, TF XLA"] = bare(net)
    for coupling in ("independent", "ot"):
        for net in ("concatsquash",) if quick else ("concatsquash", "torchcfm-mlp"):
            jits = (True, False) if coupling == "independent" and not quick else \
                (coupling == "independent",)
            for jit in jits:
                mode = "XLA" if jit else "graph"
                variants[f"ours {coupling}, {net}, TF {mode}"] = ours(coupling, net, jit)
    if not quick:
        rnode = our_model("rnode", settings, shape, None, args["sigma"])
        variants["RNODE likelihood step, concatsquash, TF XLA"] = timed(
            lambda: rnode.train_on_batch(batch(), return_dict=True))
    if have_torchcfm():
        for name in TORCHCFM:
            method = Torchcfm(name, args["seed"], args["sigma"], x[:8], 8, port_model(0))
            variants[f"torchcfm {'OT-CFM' if name == 'otcfm' else 'I-CFM'}, torchcfm-mlp"] = \
                timed(lambda m=method: m.step(batch()))
    for dataset in ("8gaussians",) if quick else ("8gaussians", "checkerboard", "digits"):
        for who, fn in coupling_alone(dataset, args["seed"]).items():
            variants[f"OT alone, {who}, {dataset}"] = timed(fn)
    if jax_worker is not None:
        for name in jax_worker.names:
            variants[name] = (lambda chunk, n=name: jax_worker.time(n, chunk))
    return variants


def coupling_alone(dataset, seed):
    """The OT coupling of one batch of 512 alone: ours and torchcfm's (where installed).

    The digits in the flow's space: dequantized, logit-transformed as `rnode train`'s
    model does (alpha 1e-6), 64-D."""
    from keras_rnode import objectives

    rng = np.random.default_rng(seed)
    x_train, _, levels = load(dataset, 100_000, 10, seed)
    x = x_train[rng.integers(0, len(x_train), BATCH)].reshape(BATCH, -1).astype(np.float64)
    if levels:
        alpha = 1e-6
        y = alpha + (1 - 2 * alpha) * (x + rng.uniform(size=x.shape)) / levels
        x = np.log(y) - np.log1p(-y)
    x = x.astype(np.float32)
    z = rng.normal(size=x.shape).astype(np.float32)
    fns = {"ours (scipy linear_sum_assignment)": lambda: objectives.ot_assignment(x, z)}
    if have_torchcfm():
        import torch
        from torchcfm.optimal_transport import OTPlanSampler

        sampler = OTPlanSampler(method="exact")
        tx, tz = torch.from_numpy(x), torch.from_numpy(z)
        fns["torchcfm (POT exact plan + its sampling)"] = lambda: sampler.sample_plan(tz, tx)
    return fns


class JaxWorker:
    """Our FM steps under JAX, in a process of its own (Keras's backend is fixed at import)."""

    def __init__(self, args):
        env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
        cmd = [sys.executable, __file__, "--jax-worker", "--seed", str(args["seed"]),
               "--sigma", str(args["sigma"])]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=HERE.parent)
        self.names = self._read()["ready"]

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"the JAX worker ended (exit {self.proc.wait()})")

    def time(self, name, chunk):
        self.proc.stdin.write(json.dumps({"name": name, "chunk": chunk}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        return reply["wall"], reply["cpu"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def jax_worker_main(seed, sigma):
    """The worker's side: build the JAX variants, then time what it is asked to."""
    import keras

    import keras_rnode as kr
    from keras_rnode import objectives

    x = kr.datasets.toy("8gaussians", 100_000, seed=seed)
    data = batches(x, BATCH, seed)
    pool = [next(data) for _ in range(64)]
    models = {}
    for coupling in ("independent", "ot"):
        keras.utils.set_random_seed(seed)
        net = kr.layers.ConcatSquashMLP(hidden=(64, 64, 64), activation="silu")
        model = kr.RNODE([kr.layers.CNF(net, trace="exact")],
                         objective=objectives.FlowMatching(coupling=coupling, sigma=sigma))
        model.build((None, 2))
        model.compile(optimizer=optimizer(), jit_compile=True)
        for b in pool[:2]:  # compile before the clock
            model.train_on_batch(b)
        models[f"ours {coupling}, concatsquash, JAX jit"] = model
    print(json.dumps({"ready": list(models)}), flush=True)
    i = 0
    for line in sys.stdin:
        ask = json.loads(line)
        model = models[ask["name"]]
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(ask["chunk"]):
            i += 1
            model.train_on_batch(pool[i % len(pool)], return_dict=True)
        print(json.dumps({"wall": (time.perf_counter() - wall) / ask["chunk"],
                          "cpu": (time.process_time() - cpu) / ask["chunk"]}), flush=True)


def time_steps(args, log):
    """Median wall and CPU ms per step of every variant, `repeats` shuffled rounds."""
    worker = None
    notes = []
    if args["jax"]:
        try:
            worker = JaxWorker(args)
        except Exception as err:  # noqa: BLE001 - reported
            notes.append(f"JAX worker failed: {type(err).__name__}: {err}")
    try:
        variants = step_variants(args, worker)
        for fn in variants.values():  # warm up: compile, then a steady call
            fn(1)
            fn(1)
        rng = random.Random(args["seed"])
        names = list(variants)
        walls, cpus = {n: [] for n in names}, {n: [] for n in names}
        for _ in range(args["repeats"]):
            rng.shuffle(names)
            for name in names:
                wall, cpu = variants[name](args["chunk"])
                walls[name].append(wall)
                cpus[name].append(cpu)
    finally:
        if worker is not None:
            worker.close()
    rows = [{"variant": n, "ms_wall": 1e3 * statistics.median(walls[n]),
             "ms_cpu": 1e3 * statistics.median(cpus[n]), "repeats": args["repeats"],
             "chunk": args["chunk"]} for n in variants]
    for row in rows:
        log(row)
    return rows, notes


# --------------------------------------------------------------------------
# Figure and report


def plot(all_runs, summaries, path, clock):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from keras_rnode.datasets import TOY_NAMES, toy_entropy

    fig, axes = plt.subplots(len(all_runs), 2, figsize=(13, 4.2 * len(all_runs)), squeeze=False)
    for row, (dataset, runs) in zip(axes, all_runs.items()):
        s = summaries[dataset]
        values = []
        for name, records in runs.items():
            # A fine-tune's inherited FM-OT curve is FM-OT's: drawn from the branch on.
            branch = max((i for i, r in enumerate(records) if r.get("inherited")), default=0)
            records = records[branch:]
            xs = [r[f"{clock}_s"] for r in records]
            ys = [r["nll"] for r in records]
            values += ys[1:] if len(ys) > 1 else ys
            row[0].plot(xs, ys, "o-", ms=2.5, lw=1.2, color=COLORS[name], label=LABELS[name])
            row[1].plot(xs, [r["eval_nfe"] for r in records], "o-", ms=2.5, lw=1.2,
                        color=COLORS[name], label=LABELS[name])
        if math.isfinite(s["target"]):
            row[0].axhline(s["target"], color="grey", lw=0.8, ls=":",
                           label=f"target {s['target']:.3g}")
        entropy = toy_entropy(dataset) if dataset in TOY_NAMES else None
        if entropy is not None:
            row[0].axhline(entropy, color="black", lw=0.8, ls="--", label="entropy (floor)")
        finite = [v for v in values if math.isfinite(v)]
        if finite:
            low = min(finite + ([entropy] if entropy else []))
            row[0].set_ylim(low - 0.1, min(max(finite), low + 3.0) + 0.1)
        row[0].set(xlabel=f"training {clock} time [s]", ylabel=f"held-out {s['unit']}",
                   title=f"{dataset}: held-out {s['unit']} (evaluation off the clock)")
        row[1].set(xlabel=f"training {clock} time [s]", ylabel="evaluation NFE (dopri5 1e-5)",
                   title=f"{dataset}: NFE of the held-out evaluation")
        row[1].set_yscale("log")
        for ax in row:
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xlim(left=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    save_figure(fig, path)


def fmt(value, spec=".1f", none="-"):
    return none if value is None or (isinstance(value, float) and math.isnan(value)) \
        else format(value, spec)


def report(args, summaries, step_rows, notes, wall_s, figure, whole=True):
    from _timing import section_head

    packages = ["keras", "torch"] + (["torchcfm", "pot"] if have_torchcfm() else [])
    lines = section_head(HEADING, args["command"], *packages)
    add = lines.append
    clock = args["clock"]
    def each(key, unit=""):
        return ", ".join(f"{d} {args[key][d]:g}{unit}" for d in summaries)

    add(f"- Setup: benchmarks/flow_matching.py's docstring: every method in one process, "
        f"interleaved by training {clock} time; TensorFlow and PyTorch threads "
        f"{args['threads']}; batch {BATCH}, Adam {LR:g}, sigma {args['sigma']:g}, seed "
        f"{args['seed']}; evaluation (dopri5 1e-5, exact trace in 2-D) off the clock; RNODE "
        f"budget {each('budgets', ' s')}, the others {args['fm_share']:g}x that or "
        f"{args['max_fm_steps']} steps; the fine-tune branches off FM-OT after "
        f"{args['switch_share']:g} of that and trains by likelihood to its end. "
        f"{'Whole run' if whole else 'This run (no race)'} {wall_s / 60:.1f} min. Records: `{args['out']}/flow_matching_<dataset>.jsonl`, "
        "`flow_matching_steps.jsonl`.")
    add("")
    if summaries:
        add(f"![held-out NLL and evaluation NFE against training time, a curve per method]"
            f"({figure})")
        add("")
        add(f"Times are training {clock} time in seconds (wall in brackets); ms / step: "
            "medians over the run's steps. NLL at budget: the last evaluation within "
            f"{args['fm_share']:g}x RNODE's budget. Kinetic: held-out, at the end.")
        add("")
        add("| data set | method | steps | ms / step (CPU, wall) | time to target [s] "
            "| steps to target | NLL at budget | final NLL | eval NFE (end) "
            "| eval NFE at target | kinetic (end) |")
        add("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for s in summaries.values():
            for name, m in s["methods"].items():
                reach = ("not reached" if m["target_step"] is None else
                         f"{m[f'target_{clock}_s']:.1f} ({m['target_wall_s']:.1f})")
                failed = f" ({m['failed']})" if m["failed"] else ""
                add(f"| {s['dataset']} ({s['target']:.3f} {s['unit']}) | {LABELS[name]}{failed} "
                    f"| {m['steps']} | {fmt(m['ms_step_cpu'])}, {fmt(m['ms_step_wall'])} "
                    f"| {reach} | {fmt(m['target_step'], 'd')} | {m['nll_at_budget']:.3f} "
                    f"| {m['final_nll']:.3f} | {m['final_eval_nfe']:.0f} "
                    f"| {fmt(m['target_eval_nfe'], '.0f')} | {m['final_kinetic']:.3f} |")
        add("")
        add("Goals (issue 25), as measured:")
        add("")
        for s in summaries.values():
            for g in s["goals"].values():
                add(f"- {s['dataset']}: {'met' if g['met'] else 'MISSED'}: {g['text']}.")
        add("")
        by = {r["variant"]: r["ms_cpu"] for r in step_rows}
        step, alone = (by.get("ours ot, concatsquash, TF graph"),
                       by.get("OT alone, ours (scipy linear_sum_assignment), 8gaussians"))
        if step and alone:
            add(f"- What limits FM-OT's time: its step takes {step:.1f} ms (CPU), of which the "
                f"assignment alone takes {alone:.1f} ms on 8gaussians (step part below).")
        for s in summaries.values():
            a = s.get("activation")
            if a:
                add(f"- {s['dataset']}, the network: at step {a['step']} FM-OT on the "
                    f"likelihood's softplus net is at {a['softplus']:.3f} {s['unit']} (eval "
                    f"NFE {a['softplus_nfe']:.0f}), on flow matching's default SiLU net at "
                    f"{a['silu']:.3f} (eval NFE {a['silu_nfe']:.0f}).")
        add("")
    if step_rows:
        add(f"Step times at batch {BATCH} on 8gaussians: medians of {step_rows[0]['repeats']} "
            f"shuffled rounds of {step_rows[0]['chunk']} steps each, ms per step (the OT rows: "
            "per assignment).")
        add("")
        add("| variant | CPU ms | wall ms |")
        add("|---|---:|---:|")
        for r in step_rows:
            add(f"| {r['variant']} | {r['ms_cpu']:.2f} | {r['ms_wall']:.2f} |")
        add("")
        by = {r["variant"]: r["ms_cpu"] for r in step_rows}
        for a, b, what in (
                ("ours independent, torchcfm-mlp, TF XLA", "torchcfm I-CFM, torchcfm-mlp",
                 "equal network, independent: ours (TF XLA) / torchcfm"),
                ("ours ot, torchcfm-mlp, TF graph", "torchcfm OT-CFM, torchcfm-mlp",
                 "equal network, OT: ours (TF graph) / torchcfm"),
                ("bare Keras model, the same regression, torchcfm-mlp, TF XLA",
                 "torchcfm I-CFM, torchcfm-mlp", "equal network, a bare Keras model / torchcfm"),
                ("ours independent, torchcfm-mlp, TF XLA",
                 "bare Keras model, the same regression, torchcfm-mlp, TF XLA",
                 "equal network, ours / a bare Keras model of the same regression"),
                ("ours ot, concatsquash, JAX jit", "ours ot, concatsquash, TF graph",
                 "FM-OT: JAX jit / TF graph"),
                ("ours independent, concatsquash, JAX jit", "ours independent, concatsquash, "
                 "TF XLA", "FM: JAX jit / TF XLA")):
            if a in by and b in by:
                goal = "; goal <= 1" if "ours" in what and "torchcfm" in what else ""
                add(f"- {what}: {by[a] / by[b]:.2f} (CPU time{goal})")
        ot, independent = (by.get(f"ours {c}, concatsquash, TF graph")
                           for c in ("ot", "independent"))
        if ot and independent:
            add(f"- the OT coupling in the step (TF graph, FM-OT minus FM): "
                f"{ot - independent:.1f} ms; alone: see the OT rows")
        add("")
    for n in notes:
        add(f"- {n}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------


def _per_dataset(ctx, param, value):
    """'8gaussians=100,digits=300' or one number for every data set -> {name: value}."""
    if value is None:
        return None
    try:
        if "=" not in value:
            return {"*": float(value)}
        return {k.strip(): float(v) for k, v in (p.split("=") for p in value.split(","))}
    except ValueError:
        raise click.BadParameter("a number, or NAME=NUMBER,... per data set") from None


def _pick(given, defaults, names):
    given = given or {}
    return {d: float(given.get(d, given.get("*", defaults.get(d, 0)))) for d in names}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--datasets", default="8gaussians,checkerboard,digits", show_default=True,
              help="Comma-separated, among 8gaussians, checkerboard, digits.")
@click.option("--methods", default=",".join(METHODS), show_default=True,
              help="Comma-separated, among " + ", ".join(METHODS) + ".")
@click.option("--budget-s", callback=_per_dataset, default=None,
              help="RNODE's training time per data set, seconds: one number or NAME=S,... "
                   "(default " + ", ".join(f"{k}={v:g}" for k, v in BUDGETS.items()) + ").")
@click.option("--fm-share", type=click.FloatRange(0, 1, min_open=True), default=0.5,
              show_default=True, help="The other methods' budget, as a share of RNODE's.")
@click.option("--max-fm-steps", type=click.IntRange(1), default=10000, show_default=True,
              help="At most this many flow matching steps per method.")
@click.option("--switch-share", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="The fine-tune branches off FM-OT at its first evaluation after this "
                   "share of its budget, and trains by likelihood for the rest of it.")
@click.option("--eval-every-fm", type=click.IntRange(1), default=50, show_default=True,
              help="Flow matching steps between evaluations (at first; the gap grows to a "
                   "tenth of the steps so far).")
@click.option("--sigma", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Flow matching's sigma, ours and torchcfm's (both default to 0).")
@click.option("--n-train", type=click.IntRange(1), default=100_000, show_default=True,
              help="Training points of each 2-D data set (`rnode train`'s).")
@click.option("--n-test", type=click.IntRange(1), default=2000, show_default=True,
              help="Held-out 2-D points, toy(name, n, seed + 1).")
@click.option("--n-kinetic", type=click.IntRange(1), default=500, show_default=True,
              help="Held-out points whose kinetic energy is integrated at each evaluation.")
@click.option("--clock", type=click.Choice(["cpu", "wall"]), default="cpu", show_default=True,
              help="What budgets, times to target and the figure count: the training steps' "
                   "process CPU time (steady on a shared machine with one thread) or wall.")
@click.option("--repeats", type=click.IntRange(1), default=30, show_default=True,
              help="Rounds of the step-time part.")
@click.option("--chunk", type=click.IntRange(1), default=5, show_default=True,
              help="Steps per timed call in the step-time part.")
@click.option("--jax/--no-jax", default=True, show_default=True,
              help="Time our FM steps under JAX too (a worker process).")
@click.option("--race/--no-race", "race_part", default=True, show_default=True,
              help="Train the methods (the part with the figure); --no-race reports the "
                   "training rows of the records already in --out.")
@click.option("--steps/--no-steps", "step_part", default=True, show_default=True,
              help="Time single steps.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder of the records and figure (default benchmarks/results; a new "
                   "temporary folder with --quick).")
@click.option("--jax-worker", is_flag=True, hidden=True)
@common_options(HEADING, quick="Smoke run of about a minute: 8gaussians, a few steps of each "
                "method, small held-out sets, 2 timing rounds; into a temporary folder.",
                no_write="Only print the section.",
                threads="TensorFlow and PyTorch threads (0: their defaults; the JAX worker "
                        "runs one).")
def main(datasets, methods, budget_s, fm_share, max_fm_steps, switch_share,
         eval_every_fm, sigma, n_train, n_test, n_kinetic, clock, repeats, chunk, jax, race_part,
         step_part, out, jax_worker, quick, results, no_write, threads, seed):
    """Flow matching (ours and torchcfm's) against RNODE's likelihood training."""
    if jax_worker:
        return jax_worker_main(seed, sigma)
    names = [d for d in datasets.split(",") if d]
    unknown = [d for d in names if d not in (*TARGETS, "digits")]
    if unknown:
        raise click.BadParameter(f"no target for {unknown}", param_hint="--datasets")
    chosen = [m for m in methods.split(",") if m]
    if not set(chosen) <= set(METHODS):
        raise click.BadParameter(f"methods are among {METHODS}", param_hint="--methods")
    notes = []
    if not have_torchcfm() and set(chosen) & set(TORCHCFM):
        chosen = [m for m in chosen if m not in TORCHCFM]
        notes.append("torchcfm is not installed here: its methods were left out (see the "
                     "docstring for the benchmark's environment)")
    if quick:
        names = ["8gaussians"]
        budget_s = budget_s or {"*": 3.0}
        max_fm_steps, eval_every_fm, n_train, n_test, n_kinetic = 12, 4, 4096, 200, 50
        switch_share = 0.1
        repeats, chunk = 2, 1
    threads_label = set_threads(threads)
    if threads:
        import torch

        torch.set_num_threads(threads)
        torch.set_num_interop_threads(threads)
    out = Path(out) if out else (Path(tempfile.mkdtemp(prefix="fm-quick-")) if quick
                                 else DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    args = dict(
        command=command_line(), methods=chosen, budgets=_pick(budget_s, BUDGETS, names),
        fm_share=fm_share, max_fm_steps=max_fm_steps,
        switch_share=switch_share, eval_every_fm=eval_every_fm,
        sigma=sigma, n_train=n_train, n_test=n_test, n_kinetic=n_kinetic, clock=clock,
        repeats=repeats, chunk=chunk, jax=jax, threads=threads_label, seed=seed,
        out=_shown(out), likelihood_every=2 if quick else None, quick=quick)
    started = time.perf_counter()
    config = dict(args, machine=machine(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    summaries, all_runs = {}, {}
    if race_part:
        for dataset in names:
            path = out / f"flow_matching_{dataset}.jsonl"
            with path.open("w") as f:
                f.write(json.dumps({"config": config, "dataset": dataset}) + "\n")

                def log(row, f=f, dataset=dataset):
                    f.write(json.dumps({"dataset": dataset, **row}) + "\n")
                    f.flush()
                    click.echo(f"{dataset:>12} {row['method']:>8} step {row['step']:6d}  "
                               f"{row['cpu_s']:8.1f} s CPU {row['wall_s']:8.1f} s wall  "
                               f"nll {row['nll']:.3f}  eval nfe {row['eval_nfe']:.0f}  "
                               f"kinetic {row['kinetic']:.3f}", err=True)

                runs, levels = race(dataset, args, log)
                summaries[dataset] = summarize(dataset, runs, levels, args)
                f.write(json.dumps({"summary": summaries[dataset]}) + "\n")
            all_runs[dataset] = {name: run.records for name, run in runs.items()}
        plot(all_runs, summaries, out / "flow_matching.png", clock)
    else:
        summaries, race_config = recorded_summaries(out, names)
        if summaries:
            notes.append(f"the training rows and figure are from the records of a race run "
                         f"{race_config['date']} (`{race_config['command']}`); this run "
                         "timed the steps only")
    step_rows = []
    if step_part:
        with (out / "flow_matching_steps.jsonl").open("w") as f:
            f.write(json.dumps({"config": config}) + "\n")

            def log_step(row, f=f):
                f.write(json.dumps(row) + "\n")
                click.echo(f"{row['variant']:>60}  {row['ms_cpu']:8.2f} ms CPU  "
                           f"{row['ms_wall']:8.2f} ms wall", err=True)

            step_rows, step_notes = time_steps(args, log_step)
            notes += step_notes
    figure = os.path.relpath(out / "flow_matching.png", HERE)
    section = report(args, summaries, step_rows, notes, time.perf_counter() - started, figure,
                     whole=race_part)
    publish(section, results, quick, no_write)
    click.echo(f"records and figure in {out}", err=True)


def recorded_summaries(out, names):
    """The summaries of an earlier race's records in `out`, and that race's config."""
    summaries, config = {}, None
    for dataset in names:
        path = out / f"flow_matching_{dataset}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if rows and "summary" in rows[-1]:
            summaries[dataset] = rows[-1]["summary"]
            config = rows[0]["config"]
    return summaries, config


def _shown(path):
    path = Path(path).resolve()
    try:
        return str(path.relative_to(HERE.parent))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    main()
