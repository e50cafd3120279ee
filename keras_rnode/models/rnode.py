"""RNODE: a chain of CNF blocks trained by likelihood, with penalties on their dynamics."""

import math
import warnings
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_rnode import backend, checks, objectives, regularizers
from keras_rnode.backend.distribute import scale_loss
from keras_rnode.layers.cnf import CNF, EVALUATION_SEED
from keras_rnode.layers.transforms import Dequantize, LogitTransform, bits_per_dim, check_levels
from keras_rnode.solvers.solution import Status

LOG_2PI = math.log(2.0 * math.pi)
# RNODE's lambda_K = lambda_J = 0.01 (Finlay et al. 2020), the weights a model
# takes unless told otherwise.
DEFAULT_REGULARIZERS = {"kinetic": 0.01, "jacobian": 0.01}


def standard_normal_log_prob(z):
    axes = tuple(range(1, len(z.shape)))
    dims = math.prod(z.shape[1:])
    return -0.5 * ops.sum(ops.square(z), axis=axes) - 0.5 * dims * LOG_2PI


class Encoding(NamedTuple):
    """Continuous data carried to the base: the latent parts (a list of (batch, *shape_i)
    tensors, `RNODE.latent_shapes`), log |det dz/dy| of the whole map (batch,), in nats,
    and the penalties asked for, name -> (batch,) summed over the blocks."""

    latents: list
    log_det: object
    penalties: dict


def add_penalties(total, new):
    """Two dicts of per-sample penalties added up by name."""
    return {**total, **{k: total[k] + v if k in total else v for k, v in new.items()}}


def flow_through(blocks, x, delta=0.0, sums=None, **call_options):
    """x through CNF blocks in order, each called with `call_options` (context, training,
    penalties, probes, per_probe): (z, delta_logp sum, penalty sums), the sums carried on."""
    sums = dict(sums or {})
    for block in blocks:
        out = block(x, **call_options)
        x, delta, sums = out.z, delta + out.delta_logp, add_penalties(sums, out.penalties)
    return x, delta, sums


def flow_back(blocks, z, context=None, delta=0.0):
    """z back through CNF blocks in reverse order: (x, the sum of their delta_logp, as
    the forward solves from x would report it)."""
    for block in reversed(blocks):
        z, d, _ = block.inverse(z, context)
        delta = delta + d
    return z, delta


class SolveFailed(ValueError):
    """An evaluation solve that stopped short of its end (`Status`): its state is no result."""


class FiniteMean(keras.metrics.Mean):
    """A mean that leaves out NaN and inf values (steps the optimizer skipped)."""

    def update_state(self, values, sample_weight=None):
        finite = ops.isfinite(values)
        weight = ops.cast(finite, self.dtype)
        if sample_weight is not None:
            weight = weight * ops.cast(sample_weight, self.dtype)
        super().update_state(ops.where(finite, values, 0.0), sample_weight=weight)


@keras.saving.register_keras_serializable(package="keras_rnode")
class RNODE(keras.Model):
    """A density model: optional dequantization and logit transform, then CNF blocks.

    Args:
        blocks: a list of `keras_rnode.layers.CNF`.
        kinetic, jacobian: lambda_K and lambda_J, shorthand for
            regularizers={"kinetic": kinetic, "jacobian": jacobian} (each 0.01
            unless given).
        levels: grey levels L of integer image data; then the data is
            dequantized and the objective is bits/dim. None: continuous
            data, objective in nats.
        logit_alpha: apply the logit transform with this alpha (None: no
            transform).
        seed: seed of the dequantization noise.
        regularizers: the general form, {penalty name: weight >= 0}, names
            registered in `keras_rnode.regularizers` (kinetic, jacobian,
            directional, total_derivative, or your own). Default
            {"kinetic": 0.01, "jacobian": 0.01}, the paper's.
        objective: how training fits the flow (`keras_rnode.objectives`):
            "likelihood" (the default: solve and minimize nats or bits/dim
            plus the penalties) or flow matching, "flow_matching" or
            `FlowMatching(coupling="independent" | "ot", sigma=0.0)` (no
            solve in training; the penalties wait for a likelihood phase).
            Settable: `model.objective = "likelihood"`, then compile and fit,
            fine-tunes a flow-matching model by likelihood.

    `model(x)` returns log p(x) per sample (of the dequantized y in [0,1)^D
    for images). Training minimizes bpd (or nats) + sum over the
    penalties of weight * batch mean, each penalty summed over the blocks
    and integrated only where its weight is > 0; fit logs loss, bpd or nll,
    each such penalty under its name, nfe, solver_failures and (with the
    adjoint gradient, where the backend reports it) backward_nfe.

    Flow matching logs loss and flow_matching (the regression loss, per
    event dimension) and no solver figures: it solves nothing.

    Raises ValueError for blocks that are not CNFs, an unknown penalty, a
    negative weight, both `regularizers` and kinetic/jacobian, or an
    objective the model cannot train with.
    """

    def __init__(self, blocks, kinetic=None, jacobian=None, levels=None, logit_alpha=None,
                 seed=None, regularizers=None, objective="likelihood", **kwargs):
        # Data, log-densities and transforms stay in the variable dtype under a mixed
        # policy (the dynamics alone compute in float16): Keras must not cast them.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        blocks = list(blocks)
        if not blocks or not all(isinstance(b, CNF) for b in blocks):
            raise ValueError("RNODE needs a non-empty list of keras_rnode.layers.CNF blocks, "
                             f"got {[type(b).__name__ for b in blocks]}")
        self.blocks = blocks
        self.levels = levels
        self._objective = objectives.Likelihood()
        self.regularizers = _regularizers(regularizers, kinetic, jacobian)
        self.objective = objective
        self.logit_alpha = logit_alpha
        self.seed = seed
        policy = keras.DTypePolicy(self.dtype_policy.variable_dtype)
        self.dequantize = Dequantize(levels, seed=seed, dtype=policy) if levels else None
        self.logit = LogitTransform(logit_alpha, dtype=policy) if logit_alpha else None
        self._skips_bad_steps = False

    @property
    def regularizers(self):
        """{penalty name: weight}, as given (zeros included); set it to train with others."""
        return dict(self._regularizers)

    @regularizers.setter
    def regularizers(self, value):
        self._regularizers = regularizers.weights(value)
        self._make_trackers()

    @property
    def objective(self):
        """The training objective (`keras_rnode.objectives`): Likelihood() or FlowMatching(...).

        Set it by name or value; compile again before the next fit (the
        compiled training step is dropped).
        """
        return self._objective

    @objective.setter
    def objective(self, value):
        objective = objectives.get(value)
        if isinstance(objective, objectives.FlowMatching):
            self._check_flow_matching(objective)
        self._objective = objective
        self._make_trackers()
        # A training step compiled for the other objective must not run on.
        for name in ("train_function", "test_function", "predict_function"):
            if getattr(self, name, None) is not None:
                setattr(self, name, None)

    def _check_flow_matching(self, objective):
        """ValueError unless flow matching has one path to regress on: data to noise."""
        if type(self)._forward is not RNODE._forward:
            raise ValueError(
                f"flow matching regresses one velocity field along a path from the data to "
                f"the base; {type(self).__name__} squeezes and factors out parts of the "
                "state between its blocks, so no such path runs through it: train it by "
                "likelihood")
        if any(b.train_T for b in self.blocks):
            raise ValueError("flow matching fixes the time interval of the path; train_T "
                             "(a learned end time) is for the likelihood objective")
        if objective.coupling == "ot" and self.conditional:
            raise ValueError(
                "coupling='ot' pairs data with noise across the batch, so the noise paired "
                "with a given context would no longer be N(0, I): a conditional flow takes "
                "coupling='independent'")

    @property
    def kinetic(self):
        """lambda_K: the weight of the kinetic penalty (0 when it is not trained with)."""
        return self._regularizers.get("kinetic", 0.0)

    @property
    def jacobian(self):
        """lambda_J: the weight of the Jacobian Frobenius penalty (0 when not trained with)."""
        return self._regularizers.get("jacobian", 0.0)

    @property
    def trained_penalties(self):
        """The names of the penalties training integrates: those of weight > 0."""
        return tuple(name for name, weight in self._regularizers.items() if weight > 0)

    @property
    def likelihood_metric(self):
        """The name the likelihood is logged under: "bpd" for images, "nll" otherwise."""
        return "bpd" if self.levels else "nll"

    def _make_trackers(self):
        if isinstance(self._objective, objectives.FlowMatching):
            # No solve: no solver figures.
            name = objectives.FlowMatching.name
            object.__setattr__(self, "_trackers", {name: keras.metrics.Mean(name=name)})
            return
        names = (self.likelihood_metric, *self.trained_penalties, "nfe")
        # Only the adjoint solves backwards, and JAX cannot report it.
        if backend.REPORTS_BACKWARD and any(b.train_solver.gradient == "adjoint"
                                            for b in self.blocks):
            names += ("backward_nfe",)
        trackers = {name: keras.metrics.Mean(name=name) for name in names}
        # Training steps (per epoch) whose solve stopped short of T.
        trackers["solver_failures"] = keras.metrics.Sum(name="solver_failures")
        # Not tracked as layer attributes: `metrics` lists the current ones, and
        # trackers replaced by a new set of penalties must not linger there.
        object.__setattr__(self, "_trackers", trackers)

    # The density --------------------------------------------------------

    def build(self, input_shape):
        shape = self._data_shape(input_shape)
        self.event_shape = shape[1:]
        for block in self.blocks:
            # Deserialized blocks arrive built (their own build config);
            # building again would add their weights twice.
            if not block.built:
                block.build(shape)
        self.built = True

    @property
    def conditional(self):
        """True when the blocks' dynamics take a context: then log_prob(x, context), fit on
        (x, context) pairs, sample(n, context)."""
        return self.blocks[0].conditional

    @property
    def state_dtype(self):
        """The dtype of data, latents and log-densities: float32 under a mixed policy."""
        return keras.backend.standardize_dtype(self.dtype_policy.variable_dtype)

    @property
    def latent_shapes(self):
        """The shapes of the latent parts `encode` returns and `decode` takes, per sample:
        one part of the event shape here; a multiscale model factors out several."""
        return [tuple(self.event_shape)]

    def _flow(self, x, context, training, penalties=(), deterministic=None, probes=None,
              per_probe=False, strict=True):
        """x (given the context) -> (log p per sample, the penalties' sums).

        With per_probe, log p is (probes, batch): one row per Hutchinson probe
        of the evaluation (see `CNF.call`).
        """
        x = self._checked_data(x, context)
        if self.dequantize is not None:
            # Evaluation draws its u from a fixed seed: the same input, the same number.
            x, _ = self.dequantize(x, training=training, deterministic=deterministic,
                                   seed=None if training else EVALUATION_SEED)
        encoded = self.encode(x, context, training=training, penalties=penalties,
                              probes=probes, per_probe=per_probe, strict=strict)
        log_p = sum(standard_normal_log_prob(z) for z in encoded.latents) + encoded.log_det
        return log_p, encoded.penalties

    def _checked_data(self, x, context):
        """x as a tensor of the state dtype, the model built for it; ValueError for
        non-finite values (naming the first bad row), a wrong shape or bad levels."""
        checks.check_finite(x)
        checks.check_finite(context, "the context")
        if self.levels and isinstance(x, np.ndarray):
            check_levels(x, self.levels)
        x = ops.cast(ops.convert_to_tensor(x), self.state_dtype)
        if len(x.shape) < 2:
            raise ValueError(f"x must be (batch, *event_shape), got shape {tuple(x.shape)}")
        if not self.built:  # log_prob / bits_per_dim before any model(x) call
            self.build(tuple(x.shape) if context is None else
                       (tuple(x.shape), tuple(ops.shape(context))))
        elif tuple(x.shape[1:]) != tuple(self.event_shape):
            raise ValueError(f"the model takes events of shape {tuple(self.event_shape)}, got "
                             f"x of shape {tuple(x.shape)}")
        return x

    def encode(self, y, context=None, training=False, penalties=(), probes=None,
               per_probe=False, strict=True):
        """Continuous data y (batch, *event_shape) -> `Encoding(latents, log_det, penalties)`.

        y is the flow's input space: for images the dequantized y = (x + u) / L
        in [0, 1)^D (before the logit transform, which this applies). log_det
        is log |det dz/dy| in nats, so that log p(y) = sum of the latents'
        standard normal log-densities + log_det. `penalties`: names whose
        integrals to return, summed over the blocks. The solver is the
        evaluation one unless training. Not training, a solve that stops short
        of its end raises SolveFailed in eager code (strict=False: NaN for
        the batch instead) and gives NaN for the whole batch in compiled code.
        """
        if training:
            return self._encode(y, context=context, training=True, penalties=penalties,
                                probes=probes, per_probe=per_probe)
        (y, context), clean = _clean_rows([y, context])
        encoded = self._encode(y, context=context, penalties=penalties, probes=probes,
                               per_probe=per_probe)
        (log_det,) = self._unless_failed([encoded.log_det], "evaluation", strict)
        return encoded._replace(log_det=_nan_unless(clean, log_det))

    def _encode(self, y, **call_options):
        y = ops.cast(ops.convert_to_tensor(y), self.state_dtype)
        log_det = 0.0
        if self.logit is not None:
            y, log_det = self.logit(y)
        call_options["penalties"] = tuple(call_options.get("penalties", ()))
        latents, delta, sums = self._forward(y, **call_options)
        return Encoding(latents, log_det - delta, sums)

    def decode(self, latents, context=None, strict=True):
        """Latent parts -> (y, log |det dy/dz|): the generative direction, the blocks solved
        from T back to 0 with the evaluation solver, then the logit transform's inverse.

        `latents`: tensors of shapes (n, *s) for s in `latent_shapes`; y is
        continuous (for images in [0, 1)^D, not yet floored to grey levels).
        A failed solve: as for `encode`, NaN for y and the log-det.
        """
        latents = [ops.cast(ops.convert_to_tensor(v), self.state_dtype) for v in latents]
        (*latents, context), clean = _clean_rows([*latents, context])
        y, log_det = self._inverse(latents, context)
        if self.logit is not None:
            y, logit_log_det = self.logit.inverse(y)
            log_det = log_det + logit_log_det
        y, log_det = self._unless_failed([y, log_det], "sampling", strict)
        return _nan_unless(clean, y, batch_axis=0), _nan_unless(clean, log_det)

    def _forward(self, x, **call_options):
        """The CNF part: x -> (latent parts, sum of delta_logp, penalty sums).

        `call_options` go to every block (context, training, penalties,
        probes, per_probe). Subclasses with another arrangement of blocks
        override this, `_inverse` and `latent_shapes`; the rest is shared.
        """
        z, delta, sums = flow_through(self.blocks, x, **call_options)
        return [z], delta, sums

    def _inverse(self, latents, context=None):
        """Latent parts -> (x before the logit transform, the blocks' summed delta_logp):
        the inverse of `_forward`."""
        return flow_back(self.blocks, latents[0], context)

    def _unless_failed(self, values, what, strict):
        """values, if every block's last solve succeeded. Else eager code raises SolveFailed
        (with strict) or gives NaN; compiled code, which cannot raise, gives NaN."""
        ok = self.solves_succeeded()
        known = backend.static_value(ok)
        if known is not None and bool(known):
            return values
        if known is not None and strict:
            stats = [{k: int(ops.convert_to_numpy(v)) for k, v in b.stats.items()}
                     for b in self.blocks]
            block, stat = next((b, s) for b, s in zip(self.blocks, stats) if s["status"])
            status = Status(stat["status"])
            raise SolveFailed(f"the {what} solve of {block.name} ended with status "
                              f"{status.label} after {stat['nfe']} function evaluations, so "
                              f"its result would be wrong: {status.message}")
        return [ops.where(ok, v, ops.full_like(v, float("nan"))) for v in values]

    def call(self, inputs, training=None):
        """log p per sample of x, or of (x, context) for a conditional model; in training
        a dict of log_prob and the trained penalties' sums."""
        x, context = self._split(inputs)
        if training and isinstance(self._objective, objectives.FlowMatching):
            return {objectives.FlowMatching.name: self._flow_matching_loss(x, context)}
        if training:
            log_p, sums = self._flow(x, context, True, self.trained_penalties)
            return {"log_prob": log_p, "penalties": sums}
        return self._flow(x, context, False)[0]

    def _data_shape(self, input_shape):
        """The data's shape from a build shape: x's, or (x's, the context's) when conditional
        (Keras keeps that pair, and serves the model with the pair as its input)."""
        if isinstance(input_shape[0], (tuple, list)):
            input_shape = input_shape[0]
        return tuple(input_shape)

    def _split(self, inputs):
        """(x, context) from what Keras passes to call: x, or (x, context) when conditional."""
        if self.conditional and isinstance(inputs, (tuple, list)) and len(inputs) == 2:
            return inputs[0], inputs[1]
        return inputs, None

    # Keras hands fit/evaluate's (x, context) pairs over as (x, y): a conditional
    # model takes the pair as its input instead. JAX's steps take a state first.
    def train_step(self, *state_and_data):
        return super().train_step(*self._paired(state_and_data))

    def test_step(self, *state_and_data):
        return super().test_step(*self._paired(state_and_data))

    def _paired(self, state_and_data):
        *state, data = state_and_data
        if self.conditional and isinstance(data, (tuple, list)) and len(data) == 2:
            data = (tuple(data),)
        return (*state, data)

    def log_prob(self, x, context=None, training=False, probes=None, per_probe=False,
                 midpoint=False, strict=True):
        """log p(x) per sample (nats), of x given the context (batch, C) for a conditional
        model; for images, of the dequantized y = (x + u) / L (midpoint=True: u = 0.5).

        Not training, it is deterministic: Hutchinson probes (and the
        dequantization noise) come from fixed seeds; `probes` (default each
        block's eval_probes) are averaged per sample, or with per_probe
        returned as rows, (probes, batch). A solve that stops short of its
        end raises SolveFailed in eager code (strict=False: NaN for the
        batch) and gives NaN for the whole batch in compiled or exported code.
        NaN or inf in eager x raises ValueError naming the first bad row.
        """
        return self._flow(x, context, training, deterministic=midpoint or None,
                          probes=probes, per_probe=per_probe, strict=strict)[0]

    def bits_per_dim(self, x, context=None, midpoint=False):
        """Bits/dim per sample (uniform dequantization; midpoint=True: the "clean" figure)."""
        if not self.levels:
            raise ValueError("bits_per_dim needs image data: this model was built without "
                             "levels; use log_prob (nats) instead")
        log_p = self._flow(x, context, False, deterministic=midpoint)[0]
        return bits_per_dim(log_p, math.prod(self.event_shape), self.levels)

    def penalties(self, x, context=None, names=None):
        """{name: per-sample integral over the whole flow}, summed over the blocks, (batch,).

        Each value is the integral over t in [0, T] of the penalty's per-sample
        rate (`keras_rnode.regularizers`: a mean over the event's dimensions;
        the kinetic energy integrates 0.5 mean f^2, so its unit is squared data
        units per unit time), in the state dtype. Computed with each
        block's training solver and trace (Hutchinson's probes drawn from the
        evaluation seed, the dequantization noise too), whatever the model
        trains with: `names` (a name or a list of them) defaults to the model's
        regularizers and may ask for any registered penalty. For analysis: the
        kinetic energy of a flow is a figure the field reports (Finlay et al.
        2020, Table 1). ValueError for an unknown name.
        """
        # Expressions, not an if statement: autograph (evaluation's tf.function)
        # converted that form wrongly ("tf__names() takes 0 positional arguments").
        names = self._regularizers if names is None else names
        names = (names,) if isinstance(names, str) else tuple(names)
        for name in names:
            regularizers.get(name)
        x = self._checked_data(x, context)
        if self.dequantize is not None:
            x, _ = self.dequantize(x, training=False, seed=EVALUATION_SEED)
        encoded = self._encode(x, context=context, solve_as="training", penalties=names)
        return dict(zip(names, self._unless_failed([encoded.penalties[n] for n in names],
                                                   "penalty", True)))

    def sample(self, n, context=None, seed=None):
        """n samples: images as integers in [0, L-1] (float), other data as is.

        n: a positive int, or a scalar int tensor (an export's endpoint). A
        conditional model samples given the context: (n, C), one row per
        sample, or (C,) for all n. A failed solve: as for `log_prob`.
        """
        if not self.built:
            raise ValueError("the model must be built (called on data) before sampling")
        if not ops.is_tensor(n):
            n = checks.integer(n, "n")
        if context is not None and len(ops.shape(context)) == 1:
            context = ops.tile(ops.reshape(ops.convert_to_tensor(context), (1, -1)), (n, 1))
        latents = [
            keras.random.normal(
                (n, *shape), dtype=self.state_dtype,
                # An integer seed would draw the same noise for every part.
                seed=self.blocks[0].seed_generator if seed is None else seed + i)
            for i, shape in enumerate(self.latent_shapes)]
        y, _ = self.decode(latents, context)
        if self.levels:
            y = ops.clip(ops.floor(y * self.levels), 0, self.levels - 1)
        return y

    def as_distribution(self):
        """This built, unconditional model as a `tfp.distributions.TransformedDistribution`
        (TensorFlow only; shapes and errors: `keras_rnode.distributions.as_distribution`)."""
        from keras_rnode.distributions import as_distribution
        return as_distribution(self)

    # Training -------------------------------------------------------------

    def likelihood_loss(self, log_p):
        """Per-sample bits/dim (images) or nats (other data) of log p."""
        if self.levels:
            return bits_per_dim(log_p, math.prod(self.event_shape), self.levels)
        return -log_p

    def _flow_matching_loss(self, x, context):
        """The per-sample flow matching loss of a batch (`keras_rnode.objectives`).

        In the flow's space (after dequantization and the logit transform): a
        base draw z per point (paired by the minibatch OT assignment for
        coupling="ot"), t ~ U[0, T] per point, and the regression of the
        dynamics at (t, z_t) onto the path's velocity. A chain of blocks is one
        path over the sum of their intervals, each block taking its piece.
        """
        objective = self._objective
        x = self._checked_data(x, context)
        if self.dequantize is not None:
            x, _ = self.dequantize(x, training=True)
        if self.logit is not None:
            x, _ = self.logit(x)
        seed = self.blocks[0].seed_generator
        z = keras.random.normal(ops.shape(x), dtype=x.dtype, seed=seed)
        if objective.coupling == "ot":
            z = ops.take(z, backend.host_call(objectives.ot_assignment, [x, z], ops.shape(x)[:1],
                                              "int32"), axis=0)
        ends = [float(b.T) for b in self.blocks]
        total = sum(ends)
        batch = ops.shape(x)[:1]
        t = keras.random.uniform(batch, 0.0, total, dtype=x.dtype, seed=seed)
        eps = keras.random.normal(ops.shape(x), dtype=x.dtype, seed=seed) if objective.sigma \
            else None
        z_t, target = objectives.straight_path(x, z, t, total, objective.sigma, eps)
        velocity, start = 0.0, 0.0
        for i, (block, end) in enumerate(zip(self.blocks, ends)):
            local = t - start
            inside = (local >= 0) & ((local < end) | (i == len(self.blocks) - 1))
            f = block.velocity(ops.clip(local, 0.0, end), z_t, context)
            velocity = velocity + ops.where(
                ops.reshape(inside, (-1,) + (1,) * (len(x.shape) - 1)), f, 0.0)
            start += end
            # There was no solve: the stats say so (a watch reads them after the step).
            for name, value in (("nfe", 0), ("accepted", 0), ("rejected", 0), ("status", 0)):
                block.stats[name].assign(value)
        return objectives.regression_loss(velocity, target)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        name = objectives.FlowMatching.name
        if isinstance(self._objective, objectives.FlowMatching) and not isinstance(y_pred, dict):
            # evaluate(): the flow matching loss of the data, as fit reports it (held-out
            # log-densities are log_prob's, or keras_rnode.evaluation's).
            y_pred = {name: self._flow_matching_loss(*self._split(x))}
        if isinstance(y_pred, dict) and name in y_pred:
            loss = _batch_mean(y_pred[name])
            self._track({name: loss}, loss, y_pred[name])
            return scale_loss(loss)
        if not isinstance(y_pred, dict):  # evaluate(): y_pred is log p
            y_pred = {"log_prob": y_pred, "penalties": {}}
        per_sample = self.likelihood_loss(y_pred["log_prob"])
        values = {self.likelihood_metric: _batch_mean(per_sample)}
        loss = values[self.likelihood_metric]
        for name, weight in self._regularizers.items():
            if name in y_pred["penalties"]:
                values[name] = _batch_mean(y_pred["penalties"][name])
                loss = loss + weight * values[name]
        self._track(values, loss, per_sample)
        # The forward solves' stats are read here, not in compute_metrics:
        # Keras's JAX trainer holds the layers' state only while the loss
        # is computed.
        nfe = sum(ops.cast(b.stats["nfe"], "float32") for b in self.blocks)
        self._trackers["nfe"].update_state(nfe)
        self._trackers["solver_failures"].update_state(
            ops.cast(ops.logical_not(self.solves_succeeded()), "float32"))
        # Under a tf.distribute strategy the replicas' gradients are summed.
        return scale_loss(loss)

    def _track(self, values, loss, per_sample):
        """Update the trackers of `values`, each step weighted by its batch size, as Keras
        weighs its loss: an empty batch changes no mean. A step the optimizer skips (a
        non-finite loss) must not turn the epoch's means into NaN either."""
        weight = ops.cast(ops.shape(per_sample)[0], "float32")
        if self._skips_bad_steps:
            weight = weight * ops.cast(ops.isfinite(loss), "float32")
        for name, value in values.items():
            if self._skips_bad_steps:
                value = ops.where(ops.isfinite(value), value, 0.0)
            self._trackers[name].update_state(value, sample_weight=weight)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if "backward_nfe" in self._trackers:  # after the gradient, which sets it
            backward = sum(ops.cast(b.stats["backward_nfe"], "float32") for b in self.blocks)
            self._trackers["backward_nfe"].update_state(backward)
        return self.get_metrics_result()

    def solves_succeeded(self):
        """True (a boolean tensor) when every block's last solve reached T."""
        return ops.all(ops.stack([ops.equal(b.stats["status"], 0) for b in self.blocks]))

    def set_evaluation(self, trace=None, probes=None, **solver):
        """Change how every block evaluates: its trace ("exact", "hutchinson"), its
        Hutchinson probes per sample, or fields of its evaluation SolverSettings
        (method, rtol, atol, step_size, ...). None leaves a setting as it is.
        Raises ValueError for a bad value, naming it."""
        for block in self.blocks:
            block.set_evaluation(trace=trace, probes=probes, **solver)

    def compile_from_config(self, config):
        """Compile as the saved model was (optimizer, its state, jit_compile): a model
        loaded from .keras trains on without compile(). Keras skips this for a
        model whose compile() is its own."""
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def compile(self, optimizer="rmsprop", **kwargs):
        super().compile(optimizer=optimizer, **kwargs)
        self._compiled_objective = self._objective
        if (self.jit_compile and isinstance(self._objective, objectives.FlowMatching)
                and self._objective.coupling == "ot" and not backend.HOST_CALLS_COMPILE):
            warnings.warn("coupling='ot' solves its assignment on the host, which XLA cannot "
                          f"compile on {backend.NAME}: training in graph mode (jit_compile="
                          "False)", RuntimeWarning, stacklevel=2)
            self.jit_compile = False
        from keras_rnode.optimizers import SkipBadSteps

        self._skips_bad_steps = isinstance(self.optimizer, SkipBadSteps)
        if self._skips_bad_steps and getattr(self, "_loss_tracker", None) is not None:
            # Keras's loss tracker would average a skipped step's NaN in. Set
            # as Trainer.compile sets it: outside the layer's state tracking
            # (a private name: tests/test_keras_private_api.py watches it).
            object.__setattr__(self, "_loss_tracker", FiniteMean(name="loss"))

    def fit(self, x=None, y=None, *args, **kwargs):
        # Keras turns arrays into tensors, which _flow cannot check: a NaN
        # must end the run before its first step, not poison a later one.
        # (A conditional model's context comes as y, or beside x in a pair.)
        compiled_for = getattr(self, "_compiled_objective", self._objective)
        if self.compiled and compiled_for != self._objective:
            # Keras would train on with the optimizer's moments of the other loss.
            raise ValueError(
                f"model.objective is {self._objective.name} but the model was compiled for "
                f"{compiled_for.name}: compile() again before fit, with a fresh optimizer "
                "(its moments estimate the other loss's gradients)")
        for what, data in (("the training data", (x, y)),
                           ("the validation data", kwargs.get("validation_data"))):
            for part in data if isinstance(data, (tuple, list)) else (data,):
                checks.check_finite(part, what)
        if not self.built and self.conditional:
            # Keras would build from x alone, without the context the blocks need.
            shapes = _pair_shapes(x, y)
            if shapes is not None:
                self.build(shapes)
        return super().fit(x, y, *args, **kwargs)

    @property
    def metrics(self):
        return [*super().metrics, *self._trackers.values()]

    # Saving ---------------------------------------------------------------

    def export(self, filepath, format="tf_saved_model", overwrite=False, verbose=None,
               **kwargs):
        """Write a TensorFlow SavedModel with `log_prob(x)` and `sample(n)` endpoints.

        x: float32 (None, *event_shape); n: scalar int32. The archive is built
        under a temporary sibling name and renamed into place when complete;
        an existing `filepath` is replaced only with overwrite=True. See
        `keras_rnode.models.export` for what the endpoints compute.
        """
        if format != "tf_saved_model":
            raise ValueError(f"RNODE exports only format='tf_saved_model', got {format!r}")
        if kwargs:
            raise ValueError(f"unexpected export arguments: {sorted(kwargs)}")
        from keras_rnode.models.export import export_saved_model

        return export_saved_model(self, filepath, overwrite=overwrite, verbose=bool(verbose))

    def get_config(self):
        config = super().get_config()
        config.update(
            blocks=[keras.saving.serialize_keras_object(b) for b in self.blocks],
            regularizers=self.regularizers, objective=self._objective.to_config(),
            levels=self.levels, logit_alpha=self.logit_alpha, seed=self.seed)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["blocks"] = [keras.saving.deserialize_keras_object(b) for b in config["blocks"]]
        # Models saved before named regularizers have the two weights as keys.
        if "regularizers" not in config:
            config["regularizers"] = {name: config.pop(name) for name in ("kinetic", "jacobian")
                                      if name in config}
        return cls(**config)

    def get_build_config(self):
        if not self.built:
            return {}
        shape = (None, *self.event_shape)
        if self.conditional:
            shape = (shape, (None, self.blocks[0].context_dim))
        return {"input_shape": shape}

    def build_from_config(self, config):
        if config:
            self.build(tuple(config["input_shape"]))


def _regularizers(given, kinetic, jacobian):
    """The {name: weight} of RNODE's arguments: `given`, or the kinetic/jacobian shorthand
    (each defaulting to the paper's 0.01)."""
    if given is not None:
        if kinetic is not None or jacobian is not None:
            raise ValueError("give regularizers={...} or the kinetic=/jacobian= shorthand, "
                             "not both")
        return given
    shorthand = {"kinetic": kinetic, "jacobian": jacobian}
    return {name: DEFAULT_REGULARIZERS[name] if w is None else w
            for name, w in shorthand.items()}


def _clean_rows(tensors):
    """(tensors with their non-finite rows zeroed, (batch,) booleans of the clean rows).

    Eager tensors with NaN or inf raise ValueError naming the first bad row
    (`checks.check_finite`); in compiled code, which cannot raise, a bad row is
    solved as zeros, so that it cannot fail its batch-mates' solve, and the
    caller gives it NaN (`_nan_unless`). None entries pass through.
    """
    present = [ops.convert_to_tensor(t) for t in tensors if t is not None]
    for t in present:
        checks.check_finite(t)
    clean = _finite_rows(present[0])
    for t in present[1:]:
        clean = clean & _finite_rows(t)
    return [None if t is None else ops.where(_per_row(clean, t), t, ops.zeros_like(t))
            for t in (None if t is None else ops.convert_to_tensor(t) for t in tensors)], clean


def _nan_unless(clean, value, batch_axis=-1):
    """value with NaN in the rows where `clean` (batch,) is False; the batch is value's
    last axis (log-densities: (batch,) or (probes, batch)) or, batch_axis=0, its first."""
    rows = _per_row(clean, value) if batch_axis == 0 else clean
    return ops.where(rows, value, ops.full_like(value, float("nan")))


def _batch_mean(values):
    """The mean of (batch,) values; 0 for an empty batch (whose step then changes nothing:
    a zero gradient), where ops.mean gives NaN."""
    count = ops.cast(ops.shape(values)[0], values.dtype)
    return ops.sum(values) / ops.maximum(count, 1.0)


def _finite_rows(x):
    """(batch,) booleans: the rows of x without NaN or inf."""
    return ops.all(ops.reshape(ops.isfinite(x), (-1, math.prod(x.shape[1:]))), axis=1)


def _per_row(rows, x):
    """(batch,) values broadcastable against x (batch, ...)."""
    return ops.reshape(rows, (-1,) + (1,) * (len(x.shape) - 1))


def _pair_shapes(x, y):
    """((None, *event_shape), (None, C)) of fit's data for a conditional model: arrays x
    and y, a pair (x, c), or a tf.data set of pairs; None where they cannot be read."""
    if isinstance(x, (tuple, list)) and len(x) == 2 and y is None:
        x, y = x
    if hasattr(x, "element_spec"):  # tf.data: (x, c) pairs
        spec = x.element_spec
        if isinstance(spec, tuple) and len(spec) == 2:
            return tuple(tuple(part.shape) for part in spec)
        return None
    if hasattr(x, "shape") and hasattr(y, "shape"):
        return (None, *tuple(x.shape)[1:]), (None, *tuple(y.shape)[1:])
    return None
