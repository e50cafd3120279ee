"""The CNF layer: a batch carried through a neural ODE with its log-density change.

Augmented state (DESIGN.md section 2), integrated from t = 0 to T:
    z           dz/dt = f(t, z)
    delta_logp  d/dt  = -tr(df/dz)
    a penalty   d/dt  = fn(inputs), for each penalty asked for by name
                        (`keras_rnode.regularizers`: kinetic, jacobian, ...)
so that log p(x) = log N(z(T); 0, I) - delta_logp(T). Only z and
delta_logp steer the step size.

Under a mixed precision policy (`keras.mixed_precision`) the dynamics
compute in the policy's dtype, but the augmented state, the error estimate
and the step control stay in the variable dtype (float32): a solve at 1e-5
cannot be controlled in float16, whose resolution is 1e-3.
"""

from typing import NamedTuple

import keras
from keras import ops

from keras_rnode import checks, regularizers
from keras_rnode.layers import divergence
from keras_rnode.layers.dynamics import validate_dynamics_output
from keras_rnode.solvers.solve import odeint
from keras_rnode.solvers.settings import (
    EVAL_PREFIX,
    SettingError,
    SolverSettings,
    evaluation_solver,
    flatten_pair,
    pop_pair,
    resolve,
    split_options,
)

STAT_NAMES = ("nfe", "accepted", "rejected", "status", "backward_nfe")
EVALUATION_SEED = 20200714  # of the evaluation probes of a CNF made without a seed
DEFAULT_GRADIENT = "direct"  # see the class docstring: why, and when not
# The penalties `regularize=True` asks for (the shorthand of RNODE's own two).
RNODE_PENALTIES = ("kinetic", "jacobian")


class FlowOutput(NamedTuple):
    """What a CNF block returns: z (x's shape), delta_logp (batch,) and the penalties
    asked for, a dict name -> (batch,) integral over the block's time interval."""

    z: object
    delta_logp: object
    penalties: dict


@keras.saving.register_keras_serializable(package="keras_rnode")
class CNF(keras.layers.Layer):
    """A continuous normalizing flow block.

    Args:
        dynamics: a Keras layer or model called as dynamics(t, z) -> dz/dt.
        trace: "hutchinson" (stochastic, one Jacobian-vector product per
            evaluation) or "exact" (D products; for low dimension).
        noise: Hutchinson probe distribution, "gaussian" or "rademacher".
        eval_trace: the trace when not training. None: exact when training's
            is, or where the event is small (`divergence.default_trace`),
            else Hutchinson's.
            Evaluation is deterministic either way: its Hutchinson probes
            are drawn from a fixed seed, so the same input gives the same
            log-density on every call, reloaded or exported.
        eval_probes: Hutchinson probes averaged per sample at evaluation
            (K; the variance of the estimate falls as 1/K).
        T: integration time (the start value, with train_T).
        train_T: learn the integration time too (FFJORD's train_T): T is
            then s^2 with s a weight starting at sqrt(T), and gets its
            gradient through the solve's end time.
        seed: seed of the Hutchinson noise generator.
        solver: the training solver, a `keras_rnode.solvers.SolverSettings`;
            or its fields as keywords (method, rtol, atol, step_size,
            max_steps, gradient, first_step, controller). The gradient is
            "direct" unless given (odeint's own default is the adjoint):
            backpropagation through the accepted steps is exact for the
            discrete solve and was measured 1.17x (TensorFlow), 1.15x (JAX)
            and 1.56x (PyTorch) faster per training step (benchmarks/RESULTS.md,
            "Backends"); its memory is one state per accepted
            step, sized to max_steps for dopri5, so take "adjoint" for large
            states (images) under an adaptive solver.
        eval_solver: the solver when not training; or its fields as
            keywords with an "eval_" prefix (eval_method, eval_rtol, ...).
            What is not given is as in training (a fixed-step evaluation
            method takes the training step size), but for the error norm:
            evaluation measures each sample's own error ("per_sample":
            a point's log-density does not depend on its batch-mates)
            unless eval_error_norm says otherwise.
        Other keywords go to keras.layers.Layer.

    Raises ValueError, prefixed with the layer's name, for a bad setting.

    Call: `cnf(x, context=None, training=None, penalties=())` returns a
    `FlowOutput(z, delta_logp, penalties)`: z of x's shape, delta_logp
    (batch,) in nats, and for each penalty named in `penalties` (see
    `keras_rnode.regularizers`) its per-sample integral over [0, T]
    (`regularize=True` in training is penalties=("kinetic", "jacobian")).
    `cnf.inverse(z, context=None)` returns a FlowOutput (x, delta_logp, {})
    with the same meaning of delta_logp. `cnf.velocity(t, z, context=None)`
    is the checked dynamics, dz/dt. `cnf.stats` holds the last solve's
    statistics.

    Conditional flows: dynamics with a `context_dim` (the squash nets built
    with one) are called as dynamics(t, z, context); `context` is then a
    per-sample tensor (batch, context_dim), handed to the solve as its
    `args`, so whatever computed it (an embedding, an encoder) trains too.
    """

    def __init__(self, dynamics, trace="hutchinson", noise="gaussian", eval_trace=None,
                 eval_probes=1, T=1.0, train_T=False, seed=None, solver=None,
                 eval_solver=None, **kwargs):
        train_options = split_options(kwargs)
        eval_options = split_options(kwargs, EVAL_PREFIX)
        # The solve is the variable dtype's (float32 under a mixed policy): Keras must
        # not cast its input, nor sqrt_end_time, to the policy's compute dtype.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        if not callable(dynamics):
            raise ValueError(f"{self.name}: dynamics must be a Keras layer called as "
                             f"dynamics(t, z), got {type(dynamics).__name__}")
        with checks.owned_by(self.name):
            checks.one_of(trace, "trace", divergence.TRACES)
            if eval_trace is not None:
                checks.one_of(eval_trace, "eval_trace", divergence.TRACES)
            checks.one_of(noise, "noise", divergence.PROBES)
            self.eval_probes = checks.integer(eval_probes, "eval_probes")
            self.T = checks.positive_finite(T, "T")
            if noise == "rademacher" and trace == "exact":
                raise ValueError(
                    "noise='rademacher' cannot go with trace='exact': the exact trace draws "
                    "no noise, so the choice of noise would be silently ignored")
            self.train_solver = resolve(solver or SolverSettings(gradient=DEFAULT_GRADIENT),
                                        train_options, self.name)
            try:
                if eval_solver is None:
                    self.eval_solver = evaluation_solver(self.train_solver, **eval_options)
                else:
                    self.eval_solver = resolve(eval_solver, eval_options, self.name)
            except SettingError as err:
                raise ValueError(err.render(EVAL_PREFIX)) from None
        self.dynamics = dynamics
        self.train_T = bool(train_T)
        self.trace = trace
        self.noise = noise
        self.seed = seed
        self.eval_trace = eval_trace
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        if len(input_shape) < 2:
            raise ValueError(f"{self.name}: input must be (batch, *event_shape), got "
                             f"shape {tuple(input_shape)}")
        z = ops.zeros((1, *input_shape[1:]), self.state_dtype)
        context = ops.zeros((1, self.context_dim), self.state_dtype) if self.conditional \
            else None
        self._call_dynamics(ops.zeros((), self.state_dtype), z, context)
        if self.train_T:
            # Not keras.initializers.Constant: it casts through float32.
            self.sqrt_T = self.add_weight(
                shape=(), name="sqrt_end_time",
                initializer=lambda shape, dtype: ops.convert_to_tensor(self.T ** 0.5, dtype))
        self.stats = {
            name: self.add_weight(shape=(), dtype="int32", initializer="zeros",
                                  trainable=False, name=name)
            for name in STAT_NAMES
        }

    @property
    def context_dim(self):
        """The width of the context the dynamics take, or None (an unconditional flow)."""
        return getattr(self.dynamics, "context_dim", None)

    @property
    def conditional(self):
        return self.context_dim is not None

    @property
    def end_time(self):
        """T: a number, or with train_T a scalar tensor (s^2, s the trained weight)."""
        return ops.square(self.sqrt_T) if self.train_T else self.T

    def call(self, x, context=None, training=None, penalties=(), regularize=False,
             probes=None, per_probe=False, solve_as=None):
        """A FlowOutput(z, delta_logp, penalties) of x at t = 0 carried to t = T.

        `penalties`: names of registered penalties to integrate beside the
        flow. The solver and trace are the training ones when training, else
        the evaluation ones; solve_as="training" takes the training solver
        and trace outside training (Hutchinson's probes then come from the
        evaluation seed, so the result is deterministic). At evaluation with
        Hutchinson's trace `probes` (default eval_probes) probes are averaged
        per sample; with per_probe=True delta_logp is (probes, batch), one
        row per probe, for the estimate's spread.
        """
        if regularize and training:
            penalties = tuple(dict.fromkeys((*RNODE_PENALTIES, *penalties)))
        if solve_as not in (None, "training", "evaluation"):
            raise ValueError(f"{self.name}: solve_as must be None, 'training' or "
                             f"'evaluation', got {solve_as!r}")
        settings = "training" if training else "evaluation"
        return self._solve(x, context, 0.0, self.end_time, solve_as or settings,
                           bool(training), tuple(penalties), probes, per_probe)

    def inverse(self, z, context=None, training=None):
        """z at t = T back to x at t = 0: a FlowOutput (x, delta_logp, {}), delta_logp the
        change of log-density the forward solve from x would report."""
        x, negative, _ = self._solve(z, context, self.end_time, 0.0,
                                     "training" if training else "evaluation", bool(training),
                                     (), probes=1)
        return FlowOutput(x, -negative, {})

    def velocity(self, t, z, context=None):
        """dz/dt = f(t, z) (or f(t, z, context)), checked to have z's shape, in the state's
        dtype (float32 under a mixed policy, whatever the dynamics compute in)."""
        z = ops.cast(ops.convert_to_tensor(z), self.state_dtype)
        if not self.built:
            self.build(z.shape)
        context = self._checked_context(context, z)
        return self._call_dynamics(ops.convert_to_tensor(t, self.state_dtype), z, context)

    @property
    def state_dtype(self):
        """The dtype of the solve's state: the variable dtype, float32 under a mixed policy."""
        return keras.backend.standardize_dtype(self.dtype_policy.variable_dtype)

    def set_evaluation(self, trace=None, probes=None, **solver):
        """Change how this block evaluates (see `RNODE.set_evaluation`); None: unchanged."""
        with checks.owned_by(self.name):
            if trace is not None:
                self.eval_trace = checks.one_of(trace, "eval_trace", divergence.TRACES)
            if probes is not None:
                self.eval_probes = checks.integer(probes, "eval_probes")
            solver = {k: v for k, v in solver.items() if v is not None}
            try:
                self.eval_solver = resolve(self.eval_solver, solver, self.name)
            except SettingError as err:
                raise ValueError(err.render(EVAL_PREFIX)) from None

    def evaluation_trace(self, event_shape):
        """The trace of evaluation for events of `event_shape` (eval_trace, or the rule)."""
        if self.eval_trace is not None:
            return self.eval_trace
        return "exact" if self.trace == "exact" else divergence.default_trace(tuple(event_shape))

    def _solve(self, x, context, t0, t1, settings, training, penalties, probes=None,
               per_probe=False):
        """The solve from t0 to t1 with the "training" or "evaluation" settings; training:
        fresh Hutchinson probes (else from the evaluation seed)."""
        x = ops.cast(ops.convert_to_tensor(x), self.state_dtype)
        if not self.built:
            self.build(x.shape)
        context = self._checked_context(context, x)
        penalty_fns = [regularizers.get(name) for name in penalties]
        as_trained = settings == "training"
        solver = self.train_solver if as_trained else self.eval_solver
        trace = self.trace if as_trained else self.evaluation_trace(x.shape[1:])
        batch = ops.shape(x)[0]
        # Several evaluation probes are one solve of the batch repeated.
        repeats = 1 if as_trained or trace == "exact" else (probes or self.eval_probes)
        if repeats > 1:
            x, context = (None if v is None else
                          ops.tile(v, (repeats,) + (1,) * (len(v.shape) - 1))
                          for v in (x, context))
        # Drawn once per solve: every stage of every step sees the same probe.
        eps = None
        if trace == "hutchinson":
            eps = self._noise(x) if training else self._evaluation_noise(x)
        zeros = ops.zeros((ops.shape(x)[0],), x.dtype)

        def augmented(t, state, *per_sample):
            z = state[0]

            def fn(z_, *per_sample_):
                return self._call_dynamics(t, z_, *per_sample_)

            if eps is None:
                f, tr, products = divergence.exact(fn, z, *per_sample)
            else:
                f, tr, products = divergence.hutchinson(fn, z, eps, *per_sample)
            if not penalty_fns:
                return (f, -tr)
            inputs = regularizers.PenaltyInputs(
                t=t, z=z, f=f, context=per_sample[0] if per_sample else None,
                trace_products=products,
                jvp=lambda v, dt=0.0: divergence.directional(
                    lambda t_, z_: self._call_dynamics(t_, z_, *per_sample), t, z, v, dt))
            return (f, -tr, *(self._penalty(name, fn_, inputs, zeros)
                              for name, fn_ in zip(penalties, penalty_fns)))

        y0 = (x, zeros) + (zeros,) * len(penalties)
        control = (True, True) + (False,) * len(penalties)
        # The context goes in as args: the solve differentiates it.
        conditioned = {} if context is None else {"args": context}
        sol = odeint(augmented, y0, t0, t1, solver=solver, error_control=control,
                     on_backward=self._record_backward, **conditioned)
        for name in STAT_NAMES[:4]:
            self.stats[name].assign(sol.stats[name])
        z, delta, *integrals = sol.y
        if repeats > 1 or per_probe:
            # z does not depend on the probe; delta_logp does, a row per probe.
            z, delta = z[:batch], ops.reshape(delta, (repeats, batch))
            delta = delta if per_probe else ops.sum(delta, axis=0) / repeats
        return FlowOutput(z, delta, dict(zip(penalties, integrals)))

    def _penalty(self, name, fn, inputs, like):
        """fn(inputs), checked to be one value per sample, in the state's dtype."""
        value = fn(inputs)
        shape, expected = checks.static_shape(value), checks.static_shape(like)
        if not checks.shapes_agree(shape, expected):
            raise ValueError(f"{self.name}: the penalty {name!r} returned shape {shape}; a "
                             f"penalty gives one value per sample, shape {expected}")
        return ops.cast(value, like.dtype)

    def _checked_context(self, context, x):
        """The context as a tensor of the layer's dtype, or a clear error for a wrong one."""
        if (context is None) == self.conditional:
            raise ValueError(
                f"{self.name}: " + (f"this flow is conditional (its dynamics take a context "
                                    f"of width {self.context_dim}); pass context=" if
                                    context is None else
                                    "this flow takes no context (its dynamics have no "
                                    "context_dim)"))
        if context is None:
            return None
        context = ops.cast(ops.convert_to_tensor(context), self.state_dtype)
        expected = (checks.static_shape(x)[0], self.context_dim)
        if not checks.shapes_agree(checks.static_shape(context), expected):
            raise ValueError(f"{self.name}: the context must be (batch, {self.context_dim}) "
                             f"for x of shape {tuple(x.shape)}, got shape "
                             f"{tuple(context.shape)}")
        return context

    def _call_dynamics(self, t, z, context=None):
        """dynamics(t, z) (or dynamics(t, z, context)), checked to have z's shape.

        Checked at every call, not only at build (batch 1): a net that drops
        or mixes rows shows itself only on a larger batch.
        """
        out = self.dynamics(t, z) if context is None else self.dynamics(t, z, context)
        out = validate_dynamics_output(
            self.name, z, out, getattr(self.dynamics, "name", type(self.dynamics).__name__))
        # A mixed policy's dynamics compute in float16; the state stays float32.
        return ops.cast(out, z.dtype)

    def _noise(self, x):
        return divergence.draw_probes(self.noise, ops.shape(x), x.dtype, self.seed_generator)

    def _evaluation_noise(self, x):
        # A fixed seed: the same input, the same probes, the same number.
        return divergence.draw_probes(self.noise, ops.shape(x), x.dtype,
                                      EVALUATION_SEED if self.seed is None else self.seed)

    def _record_backward(self, stats):
        self.stats["backward_nfe"].assign(stats["nfe"])

    def compute_output_shape(self, input_shape):
        return FlowOutput(tuple(input_shape), tuple(input_shape[:1]), {})

    def get_config(self):
        config = super().get_config()
        config.update(
            dynamics=keras.saving.serialize_keras_object(self.dynamics),
            trace=self.trace, noise=self.noise, T=self.T, train_T=self.train_T, seed=self.seed,
            eval_trace=self.eval_trace, eval_probes=self.eval_probes, **flatten_pair(self.train_solver, self.eval_solver))
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["dynamics"] = keras.saving.deserialize_keras_object(config["dynamics"])
        train, evaluation = pop_pair(config)
        return cls(solver=train, eval_solver=evaluation, **config)
