"""RNODE: a chain of CNF blocks trained with kinetic and Jacobian regularization."""

import math

import keras
import numpy as np
from keras import ops

from keras_rnode import backend, checks
from keras_rnode.backend.distribute import scale_loss
from keras_rnode.layers.cnf import CNF, EVALUATION_SEED
from keras_rnode.layers.transforms import Dequantize, LogitTransform, bits_per_dim, check_levels

LOG_2PI = math.log(2.0 * math.pi)


def standard_normal_log_prob(z):
    axes = tuple(range(1, len(z.shape)))
    dims = math.prod(z.shape[1:])
    return -0.5 * ops.sum(ops.square(z), axis=axes) - 0.5 * dims * LOG_2PI


def flow_through(blocks, x, sums=(0.0, 0.0, 0.0), **call_options):
    """x through CNF blocks in order, each called with `call_options` (context, training,
    regularize, probes, per_probe): (z, (delta, kinetic, jacobian)), the sums carried on."""
    delta, kinetic, jacobian = sums
    for block in blocks:
        out = block(x, **call_options)
        x, delta = out[0], delta + out[1]
        if len(out) == 4:  # regularized
            kinetic, jacobian = kinetic + out[2], jacobian + out[3]
    return x, (delta, kinetic, jacobian)


def flow_back(blocks, z, context):
    """z back through CNF blocks in reverse order."""
    for block in reversed(blocks):
        z, _ = block.inverse(z, context)
    return z


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
        kinetic, jacobian: lambda_K and lambda_J of the RNODE loss.
        levels: grey levels L of integer image data; then the data is
            dequantized and the objective is bits/dim. None: continuous
            data, objective in nats.
        logit_alpha: apply the logit transform with this alpha (None: no
            transform).
        seed: seed of the dequantization noise.

    `model(x)` returns log p(x) per sample (of the dequantized y in [0,1)^D
    for images). Training minimizes bpd (or nats) + lambda_K * kinetic +
    lambda_J * jacobian, regularizers summed over blocks, and logs loss,
    bpd or nll, kinetic, jacobian, nfe and (with the adjoint gradient, where
    the backend reports it) backward_nfe.
    """

    def __init__(self, blocks, kinetic=0.01, jacobian=0.01, levels=None, logit_alpha=None,
                 seed=None, **kwargs):
        super().__init__(**kwargs)
        blocks = list(blocks)
        if not blocks or not all(isinstance(b, CNF) for b in blocks):
            raise ValueError("RNODE needs a non-empty list of keras_rnode.layers.CNF blocks, "
                             f"got {[type(b).__name__ for b in blocks]}")
        self.blocks = blocks
        self.kinetic = checks.non_negative(kinetic, "kinetic")
        self.jacobian = checks.non_negative(jacobian, "jacobian")
        self.levels = levels
        self.logit_alpha = logit_alpha
        self.seed = seed
        self.dequantize = (Dequantize(levels, seed=seed, dtype=self.dtype_policy)
                           if levels else None)
        self.logit = (LogitTransform(logit_alpha, dtype=self.dtype_policy)
                      if logit_alpha else None)
        self.objective_name = "bpd" if levels else "nll"
        self.trackers = {
            name: keras.metrics.Mean(name=name)
            for name in (self.objective_name, "kinetic", "jacobian", "nfe")
            # Only the adjoint solves backwards, and JAX cannot report it.
            + (("backward_nfe",) if backend.REPORTS_BACKWARD and any(
                b.train_solver.gradient == "adjoint" for b in blocks) else ())
        }
        # Training steps (per epoch) whose solve stopped short of T.
        self.trackers["solver_failures"] = keras.metrics.Sum(name="solver_failures")
        self._skips_bad_steps = False

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

    def _flow(self, x, context, training, regularize, deterministic=None, probes=None,
              per_probe=False):
        """x (given the context) -> (log p per sample, kinetic sum, jacobian sum).

        With per_probe, log p is (probes, batch): one row per Hutchinson probe
        of the evaluation (see `CNF.call`).
        """
        checks.check_finite(x)
        checks.check_finite(context, "the context")
        if self.levels and isinstance(x, np.ndarray):
            check_levels(x, self.levels)
        x = ops.convert_to_tensor(x, self.compute_dtype)
        if len(x.shape) < 2:
            raise ValueError(f"x must be (batch, *event_shape), got shape {tuple(x.shape)}")
        if not self.built:  # log_prob / bits_per_dim before any model(x) call
            self.build(tuple(x.shape) if context is None else
                       (tuple(x.shape), tuple(ops.shape(context))))
        elif tuple(x.shape[1:]) != tuple(self.event_shape):
            raise ValueError(f"the model takes events of shape {tuple(self.event_shape)}, got "
                             f"x of shape {tuple(x.shape)}")
        if self.dequantize is not None:
            # Evaluation draws its u from a fixed seed: the same input, the same number.
            x, _ = self.dequantize(x, training=training, deterministic=deterministic,
                                   seed=None if training else EVALUATION_SEED)
        options = dict(context=context, probes=probes, per_probe=per_probe)
        latents, logdet, kinetic, jacobian = self._encode(x, training, regularize, **options)
        log_p = sum(standard_normal_log_prob(z) for z in latents) + logdet
        return log_p, kinetic, jacobian

    def _encode(self, x, training=False, regularize=False, **call_options):
        """Continuous x -> (latent parts, log-det of the whole map, kinetic, jacobian sums)."""
        logdet = 0.0
        if self.logit is not None:
            x, logdet = self.logit(x)
        latents, delta, kinetic, jacobian = self._forward(x, training, regularize,
                                                          **call_options)
        return latents, logdet - delta, kinetic, jacobian

    def _forward(self, x, training=False, regularize=False, **call_options):
        """The CNF part: x -> (latent parts, sum of delta_logp, kinetic sum, jacobian sum).

        `call_options` go to every block (context, probes, per_probe).
        Subclasses with another arrangement of blocks override this,
        `_inverse` and `_latent_shapes`; the rest of the model is shared.
        """
        z, sums = flow_through(self.blocks, x, training=training, regularize=regularize,
                               **call_options)
        return [z], *sums

    def _inverse(self, latents, context=None):
        """Latent parts -> x before the logit transform (the inverse of `_forward`)."""
        return flow_back(self.blocks, latents[0], context)

    def _latent_shapes(self):
        return [tuple(self.event_shape)]

    def call(self, inputs, training=None):
        """log p per sample of x, or of (x, context) for a conditional model; in training
        a dict of log_prob and the kinetic and jacobian sums."""
        x, context = self._split(inputs)
        if training:
            log_p, kinetic, jacobian = self._flow(x, context, True, True)
            return {"log_prob": log_p, "kinetic": kinetic, "jacobian": jacobian}
        return self._flow(x, context, False, False)[0]

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

    def log_prob(self, x, context=None, training=False, probes=None):
        """log p(x) per sample (nats), of x given the context (batch, C) for a conditional
        model; for images, of the dequantized y = (x + u) / L.

        Not training, it is deterministic: Hutchinson probes (and the
        dequantization noise) come from fixed seeds; `probes` (default each
        block's eval_probes) are averaged per sample.
        """
        return self._flow(x, context, training, False, probes=probes)[0]

    def bits_per_dim(self, x, context=None, midpoint=False):
        """Bits/dim per sample (uniform dequantization; midpoint=True: the "clean" figure)."""
        if not self.levels:
            raise ValueError("bits_per_dim needs image data: this model was built without "
                             "levels; use log_prob (nats) instead")
        log_p = self._flow(x, context, False, False, deterministic=midpoint)[0]
        return bits_per_dim(log_p, math.prod(self.event_shape), self.levels)

    def sample(self, n, context=None, seed=None):
        """n samples: images as integers in [0, L-1] (float), other data as is.

        A conditional model samples given the context: (n, C), one row per
        sample, or (C,) for all n.
        """
        if not self.built:
            raise ValueError("the model must be built (called on data) before sampling")
        n = checks.integer(n, "n")
        if context is not None and len(ops.shape(context)) == 1:
            context = ops.tile(ops.reshape(ops.convert_to_tensor(context), (1, -1)), (n, 1))
        return self._sample(n, context, seed)

    def as_distribution(self):
        """This built, unconditional model as a `tfp.distributions.TransformedDistribution`
        (TensorFlow only; shapes and errors: `keras_rnode.distributions.as_distribution`)."""
        from keras_rnode.distributions import as_distribution
        return as_distribution(self)

    def _sample(self, n, context=None, seed=None):
        """`sample` without the checks: n may be a scalar tensor (the export's endpoint)."""
        latents = [
            keras.random.normal(
                (n, *shape), dtype=self.compute_dtype,
                # An integer seed would draw the same noise for every part.
                seed=self.blocks[0].seed_generator if seed is None else seed + i)
            for i, shape in enumerate(self._latent_shapes())]
        z = self._inverse(latents, context)
        if self.logit is not None:
            z, _ = self.logit.inverse(z)
        if self.levels:
            z = ops.clip(ops.floor(z * self.levels), 0, self.levels - 1)
        return z

    # Training -------------------------------------------------------------

    def objective(self, log_p):
        if self.levels:
            return bits_per_dim(log_p, math.prod(self.event_shape), self.levels)
        return -log_p

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if not isinstance(y_pred, dict):  # evaluate(): y_pred is log p
            y_pred = {"log_prob": y_pred, "kinetic": 0.0, "jacobian": 0.0}
        objective = ops.mean(self.objective(y_pred["log_prob"]))
        kinetic = ops.mean(y_pred["kinetic"])
        jacobian = ops.mean(y_pred["jacobian"])
        loss = objective + self.kinetic * kinetic + self.jacobian * jacobian
        # A step the optimizer skips must not turn the epoch's means into NaN.
        weight = ops.cast(ops.isfinite(loss), "float32") if self._skips_bad_steps else None
        for name, value in ((self.objective_name, objective), ("kinetic", kinetic),
                            ("jacobian", jacobian)):
            if weight is not None:
                value = ops.where(ops.isfinite(value), value, 0.0)
            self.trackers[name].update_state(value, sample_weight=weight)
        # The forward solves' stats are read here, not in compute_metrics:
        # Keras's JAX trainer holds the layers' state only while the loss
        # is computed.
        nfe = sum(ops.cast(b.stats["nfe"], "float32") for b in self.blocks)
        self.trackers["nfe"].update_state(nfe)
        self.trackers["solver_failures"].update_state(
            ops.cast(ops.logical_not(self.solves_succeeded()), "float32"))
        # Under a tf.distribute strategy the replicas' gradients are summed.
        return scale_loss(loss)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if "backward_nfe" in self.trackers:  # after the gradient, which sets it
            backward = sum(ops.cast(b.stats["backward_nfe"], "float32") for b in self.blocks)
            self.trackers["backward_nfe"].update_state(backward)
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
        for what, data in (("the training data", (x, y)),
                           ("the validation data", kwargs.get("validation_data"))):
            for part in data if isinstance(data, (tuple, list)) else (data,):
                checks.check_finite(part, what)
        return super().fit(x, y, *args, **kwargs)

    @property
    def metrics(self):
        return [*super().metrics, *self.trackers.values()]

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
            kinetic=self.kinetic, jacobian=self.jacobian, levels=self.levels,
            logit_alpha=self.logit_alpha, seed=self.seed)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["blocks"] = [keras.saving.deserialize_keras_object(b) for b in config["blocks"]]
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
