"""Held-out quality of a trained model: log p in batches, nll or bits/dim, the flow's kinetic
energy, and its report."""

import json
import math
import time
import weakref

import numpy as np
from keras import ops

from keras_rnode import backend, checks
from keras_rnode.layers.transforms import bits_per_dim, check_levels
from keras_rnode.solvers.solution import Status

# model -> {key: compiled function}: what evaluation compiled for it, by what it depends on.
_COMPILED = weakref.WeakKeyDictionary()


def _compiled(model, key, fn):
    """fn(x, context=None) compiled as the backend compiles inference, once per (model, key):
    x of the model's event shape, and the context of a conditional model."""
    fns = _COMPILED.setdefault(model, {})
    if key not in fns:
        shapes = [(None, *model.event_shape)]
        if model.conditional:
            shapes.append((None, model.blocks[0].context_dim))
        fns[key] = backend.inference_function(model, fn, shapes)
    return fns[key]


def _eval_fn(model, midpoint):
    """One compiled function per (model, midpoint, evaluation settings): log p of each
    Hutchinson probe and sample, (probes, batch), with the evaluation solver."""
    def fn(x, context=None):
        # NaN for a batch whose solve failed: its status is read below.
        return model.log_prob(x, context, midpoint=midpoint, per_probe=True, strict=False)

    key = ("log_prob", midpoint,
           *((b.eval_trace, b.eval_probes, b.eval_solver) for b in model.blocks))
    return _compiled(model, key, fn)


def log_prob_batches(model, x, batch_size=500, midpoint=False, strict=True, context=None,
                     per_probe=False):
    """log p of every row of x with the model's evaluation solver; (log_p, mean NFE, status).

    log_p (nats) is (n,), averaged over the blocks' evaluation probes, or
    with per_probe (probes, n): one row per Hutchinson probe (one row for the
    exact trace). For image models `midpoint=True` dequantizes with u = 0.5
    instead of uniform noise (the "clean" figure). A conditional model needs the
    context of every row (n, C). A solve that stops short of T (max_steps,
    step underflow) or ends on NaN or inf raises a ValueError naming the
    batch, unless strict=False: then the worst status is returned. No rows give an
    empty log_p, NFE 0 and "success".
    """
    batch_size = checks.integer(batch_size, "batch size")
    if not model.built:
        raise ValueError("the model is not built: train it, call it on data, or load a "
                         "trained one before evaluating it")
    if model.levels:
        check_levels(x, model.levels)
    else:
        checks.check_finite(np.asarray(x), "data")
    if tuple(x.shape[1:]) != tuple(model.event_shape):
        raise ValueError(f"the model takes events of shape {tuple(model.event_shape)}, the "
                         f"data has shape {tuple(x.shape[1:])}")
    if (context is None) == model.conditional:
        raise ValueError("a conditional model needs the context of every row" if
                         context is None else "this model takes no context")
    if context is not None:
        context = np.asarray(context, np.float32)
        checks.check_finite(context, "the context")
        if context.shape != (len(x), model.blocks[0].context_dim):
            raise ValueError(f"the context must be ({len(x)}, "
                             f"{model.blocks[0].context_dim}), got {context.shape}")
    if not len(x):  # by design an empty result: nothing solved, nothing failed
        return np.zeros((1, 0) if per_probe else (0,), np.float32), 0.0, Status.SUCCESS.label
    fn = _eval_fn(model, bool(midpoint))
    out, nfes, status = [], [], Status.SUCCESS
    for start in range(0, len(x), batch_size):
        rows = slice(start, start + batch_size)
        batch = np.asarray(x[rows], np.float32)
        given = () if context is None else (context[rows],)
        out.append(np.asarray(ops.convert_to_numpy(fn(batch, *given))))
        nfes.append(sum(int(b.stats["nfe"].numpy()) for b in model.blocks))
        batch_status = Status(max(int(b.stats["status"].numpy()) for b in model.blocks))
        if strict and batch_status != Status.SUCCESS:
            raise ValueError(
                f"the evaluation solve of batch {start // batch_size} (rows {start} to "
                f"{start + len(batch) - 1}) ended with status {batch_status.label} after "
                f"{nfes[-1]} function evaluations: {batch_status.happened}, so its "
                f"log-densities would be wrong. What to do: {batch_status.remedy}, in the "
                "evaluation solver (rnode evaluate takes --rtol, --atol, --method and "
                "--step-size; max_steps is rnode train's --max-steps)")
        status = max(status, batch_status)
    log_p = np.concatenate(out, axis=1)
    return (log_p if per_probe else log_p.mean(axis=0)), float(np.mean(nfes)), status.label


def _kinetic_fn(model):
    """One compiled function per (model, training solvers and traces): the kinetic energy of
    each sample, (batch,), as `model.penalties` computes it (NaN where a solve failed)."""
    def fn(x, context=None):
        return model.penalties(x, context, names=("kinetic",))["kinetic"]

    return _compiled(model, ("kinetic", *((b.trace, b.train_solver) for b in model.blocks)), fn)


def kinetic_batches(model, x, batch_size=500, context=None):
    """The flow's kinetic energy over x: (the mean over the rows of the per-sample kinetic
    integral, the worst solve status).

    The integral is `model.penalties(x, names=["kinetic"])`'s (0.5 * mean
    over event dims of f^2, integrated over the flow and summed over the
    blocks), computed with each block's training solver and trace, whatever
    the model was trained with. The mean is None where a solve stopped short.
    x is checked by `log_prob_batches`, which runs first.
    """
    from keras_rnode.models.rnode import SolveFailed

    fn = _kinetic_fn(model)
    total, status = 0.0, Status.SUCCESS
    for start in range(0, len(x), batch_size):
        rows = slice(start, start + batch_size)
        given = () if context is None else (np.asarray(context[rows], np.float32),)
        try:
            kinetic = fn(np.asarray(x[rows], np.float32), *given)
        except SolveFailed:  # eager backends (PyTorch) raise; compiled ones give NaN
            kinetic = np.nan
        status = max(status, *(int(b.stats["status"].numpy()) for b in model.blocks))
        total += float(np.sum(ops.convert_to_numpy(kinetic), dtype=np.float64))
    return (total / len(x) if status == Status.SUCCESS else None), Status(status).label


def evaluate_model(model, x, batch_size=500, midpoint=True, context=None, kinetic=True):
    """Held-out quality of `model` on x with its evaluation solver, as a dict.

    Continuous data: "nll" (mean negative log-likelihood, nats). Images:
    "bpd" (bits/dim, uniform dequantization: the reported figure), and with
    midpoint=True "bpd_midpoint" (u = 0.5, the labelled "clean" figure);
    "nll" is then of the dequantized y in [0, 1)^D. With two or more
    Hutchinson probes per sample (`model.set_evaluation(probes=K)`),
    "nll_se" (and "bpd_se"): the standard error of the figure over the
    probes. Always "n", "nfe" (mean forward function evaluations per batch,
    summed over blocks), "status", "trace", "solver" (the evaluation
    solver, described) and "seconds". With kinetic=True (any objective),
    "kinetic": the flow's kinetic energy, the mean per-sample kinetic
    integral (`kinetic_batches`; None where a training solve stopped short,
    its status then in "kinetic_status"), and "kinetic_seconds", the time it
    took beside "seconds"; kinetic=False leaves it out. ValueError for data
    without rows: there is no mean to report.
    """
    if not len(x):
        raise ValueError("there is nothing to evaluate: the data has no rows (the mean "
                         "log-likelihood of no points is undefined)")
    start = time.perf_counter()
    per_probe, nfe, status = log_prob_batches(model, x, batch_size, context=context,
                                              per_probe=True)
    log_p = per_probe.mean(axis=0)
    result = {"n": int(len(x)), "nll": float(-np.mean(log_p))}
    dims = math.prod(model.event_shape)
    probes = len(per_probe)
    if probes > 1:
        # The probes are independent across samples: the mean's variance is
        # the sum of the per-sample variances of their K-probe means, over n^2.
        variance = np.sum(np.var(per_probe, axis=0, ddof=1) / probes) / len(x) ** 2
        result["nll_se"] = float(np.sqrt(variance))
    if model.levels:
        result["bpd"] = float(np.mean(bits_per_dim(log_p, dims, model.levels)))
        if "nll_se" in result:
            result["bpd_se"] = result["nll_se"] / (dims * math.log(2.0))
        if midpoint:
            clean, _, _ = log_prob_batches(model, x, batch_size, midpoint=True,
                                           context=context)
            result["bpd_midpoint"] = float(np.mean(bits_per_dim(clean, dims, model.levels)))
    block = model.blocks[0]
    trace = block.evaluation_trace(model.event_shape)
    result.update(nfe=nfe, status=status, trace=trace if probes == 1 else f"{trace} x{probes}",
                  solver=block.eval_solver.describe(),
                  seconds=round(time.perf_counter() - start, 3))
    if kinetic:
        start = time.perf_counter()
        result["kinetic"], kinetic_status = kinetic_batches(model, x, batch_size, context)
        if kinetic_status != Status.SUCCESS.label:
            result["kinetic_status"] = kinetic_status
        result["kinetic_seconds"] = round(time.perf_counter() - start, 3)
    return result


def describe_result(name, result):
    """The line a person reads for an `evaluate_model` result."""
    what = "images" if "bpd" in result else "points"
    head = f"{name} test ({result['n']} {what}): "
    if "bpd" in result:
        head += f"{result['bpd']:.4f} bits/dim (uniform dequantization)"
        if "bpd_se" in result:
            head += f" +- {result['bpd_se']:.4f} (standard error over the probes)"
        if "bpd_midpoint" in result:
            head += f", clean (midpoint) {result['bpd_midpoint']:.4f} bits/dim"
    else:
        head += f"nll {result['nll']:.4f} nats"
        if "nll_se" in result:
            head += f" +- {result['nll_se']:.4f} (standard error over the probes)"
        if result.get("entropy") is not None:
            head += f" (the data's entropy, a floor: {result['entropy']:.4f})"
    line = (f"{head}; NFE {result['nfe']:.1f} ({result['solver']}, {result['trace']} trace); "
            f"{result['seconds']:.1f} s")
    if "kinetic_seconds" in result:
        energy = ("n/a, a training solve ended with status " + result["kinetic_status"]
                  if result["kinetic"] is None else f"{result['kinetic']:.4g}")
        line += f"; kinetic energy {energy} ({result['kinetic_seconds']:.1f} s)"
    if result.get("phases"):
        line += "; trained by " + ", then ".join(map(_describe_phase, result["phases"]))
    if result["status"] != "success":
        line += f"; WARNING: solver status {result['status']}"
    return line


def _describe_phase(phase):
    """'flow matching (ot coupling, 300 steps)' for a run's phase record."""
    objective = phase["objective"]
    details = [f"{phase['steps']} steps"]
    if "coupling" in objective:
        details.insert(0, f"{objective['coupling']} coupling")
    return f"{objective['name'].replace('_', ' ')} ({', '.join(details)})"


def emit_result(name, result, json_only=False, echo=print):
    """Report a result through `echo`: the line a person reads (unless json_only), then JSON."""
    if not json_only:
        echo(describe_result(name, result))
    echo(json.dumps({"dataset": name, "split": "test", **result}))
