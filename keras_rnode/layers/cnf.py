"""The CNF layer: a batch carried through a neural ODE with its log-density change.

Augmented state (DESIGN.md section 2), integrated from t = 0 to T:
    z           dz/dt = f(t, z)
    delta_logp  d/dt  = -tr(df/dz)
    kinetic     d/dt  = 0.5 * mean over event dims of f^2      (training only)
    jacobian    d/dt  = mean over event dims of (J eps)^2       (training only)
so that log p(x) = log N(z(T); 0, I) - delta_logp(T). Only z and
delta_logp steer the step size.
"""

import math
import numbers

import keras
from keras import ops

from keras_rnode.backend import distribute
from keras_rnode.layers import divergence
from keras_rnode.solvers.odeint import check_options, odeint
from keras_rnode.solvers.tableaus import TABLEAUS

TRACES = ("hutchinson", "exact")
NOISES = ("gaussian", "rademacher")
STAT_NAMES = ("nfe", "accepted", "rejected", "status", "backward_nfe")


@keras.saving.register_keras_serializable(package="keras_rnode")
class CNF(keras.layers.Layer):
    """A continuous normalizing flow block.

    Args:
        dynamics: a Keras layer or model called as dynamics(t, z) -> dz/dt.
        trace: "hutchinson" (stochastic, one forward-mode product per
            evaluation) or "exact" (D products; for low dimension).
        noise: Hutchinson probe distribution, "gaussian" or "rademacher".
        method, rtol, atol, step_size, max_steps, gradient: the training
            solver (see `keras_rnode.odeint`).
        eval_method, eval_rtol, eval_atol, eval_step_size, eval_trace: the
            solver and trace used when not training; None means "as in
            training".
        T: integration time.
        seed: seed of the Hutchinson noise generator.

    Call: `cnf(x, training=None, regularize=False)` returns (z, delta_logp);
    with regularize=True and training, (z, delta_logp, kinetic, jacobian),
    each per sample. `cnf.inverse(z)` returns (x, delta_logp) with the same
    meaning. `cnf.stats` holds the last solve's statistics.
    """

    def __init__(self, dynamics, trace="hutchinson", noise="gaussian", method="dopri5",
                 rtol=1e-5, atol=1e-5, step_size=None, max_steps=1000,
                 gradient="adjoint", eval_method=None, eval_rtol=None, eval_atol=None,
                 eval_step_size=None, eval_trace=None, T=1.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not callable(dynamics):
            raise ValueError(f"{self.name}: dynamics must be a Keras layer called as "
                             f"dynamics(t, z), got {type(dynamics).__name__}")
        for arg, value in (("trace", trace), ("eval_trace", eval_trace or trace)):
            if value not in TRACES:
                raise ValueError(f"{self.name}: {arg} must be one of {TRACES}, got {value!r}")
        if noise not in NOISES:
            raise ValueError(f"{self.name}: noise must be one of {NOISES}, got {noise!r}")
        if noise == "rademacher" and trace == "exact":
            raise ValueError(
                f"{self.name}: noise='rademacher' cannot go with trace='exact': the exact "
                "trace draws no noise, so the choice of noise would be silently ignored")
        if isinstance(T, bool) or not isinstance(T, numbers.Real) or not (
                math.isfinite(T) and T > 0):
            raise ValueError(f"{self.name}: T must be a positive finite number, got {T!r}")
        self.dynamics = dynamics
        self.trace = trace
        self.noise = noise
        self.T = float(T)
        self.seed = seed
        self.train_solver = dict(method=method, rtol=rtol, atol=atol, step_size=step_size,
                                 max_steps=max_steps, gradient=gradient)
        # "is None", not "or": an eval_rtol of 0 is an error to report, not
        # a request for the training tolerance.
        eval_method = method if eval_method is None else eval_method
        # None is "as in training" for a fixed step too, which an adaptive
        # evaluation method must not be given.
        fixed = isinstance(eval_method, str) and eval_method in TABLEAUS and not TABLEAUS[
            eval_method].adaptive
        if eval_step_size is None and fixed:
            eval_step_size = step_size
        self.eval_solver = dict(
            method=eval_method,
            rtol=rtol if eval_rtol is None else eval_rtol,
            atol=atol if eval_atol is None else eval_atol,
            step_size=eval_step_size, max_steps=max_steps, gradient=gradient)
        eval_names = {arg: f"eval_{arg}" for arg in ("method", "rtol", "atol", "step_size")}
        for solver, names in ((self.train_solver, None), (self.eval_solver, eval_names)):
            try:
                check_options(**solver, names=names)
            except ValueError as err:
                raise ValueError(f"{self.name}: {err}") from None
        self.eval_trace = eval_trace or trace
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        if len(input_shape) < 2:
            raise ValueError(f"{self.name}: input must be (batch, *event_shape), got "
                             f"shape {tuple(input_shape)}")
        z = ops.zeros((1, *input_shape[1:]), self.compute_dtype)
        self._call_dynamics(ops.zeros((), self.compute_dtype), z)
        self.stats = {
            name: self.add_weight(shape=(), dtype="int32", initializer="zeros",
                                  trainable=False, name=name)
            for name in STAT_NAMES
        }

    def call(self, x, training=None, regularize=False):
        regularize = bool(training and regularize)
        return self._solve(x, 0.0, self.T, training, regularize)

    def inverse(self, z, training=None):
        """z at t = T back to x at t = 0; returns (x, delta_logp) as forward would."""
        x, negative = self._solve(z, self.T, 0.0, training, False)
        return x, -negative

    def _solve(self, x, t0, t1, training, regularize):
        x = ops.convert_to_tensor(x, self.compute_dtype)
        if not self.built:
            self.build(x.shape)
        solver = self.train_solver if training else self.eval_solver
        trace = self.trace if training else self.eval_trace
        # Drawn once per solve: every stage of every step sees the same probe.
        eps = self._noise(x) if trace == "hutchinson" else None
        batch = ops.shape(x)[0]
        zeros = ops.zeros((batch,), x.dtype)

        def augmented(t, state):
            z = state[0]
            fn = lambda z_: self._call_dynamics(t, z_)  # noqa: E731
            if eps is None:
                f, tr, frobenius = divergence.exact(fn, z)
            else:
                f, tr, frobenius = divergence.hutchinson(fn, z, eps)
            out = (f, -tr)
            if regularize:
                kinetic = 0.5 * divergence.event_mean(ops.square(f))
                out += (kinetic, frobenius)
            return out

        y0 = (x, zeros, zeros, zeros) if regularize else (x, zeros)
        control = (True, True, False, False)[: len(y0)]
        sol = odeint(augmented, y0, t0, t1, error_control=control,
                     on_backward=self._record_backward, **solver)
        for name in STAT_NAMES[:4]:
            self.stats[name].assign(sol.stats[name])
        return sol.y

    def _call_dynamics(self, t, z):
        """dynamics(t, z), checked to have z's shape.

        Checked at every call, not only at build (batch 1): a net that drops
        or mixes rows shows itself only on a larger batch.
        """
        out = self.dynamics(t, z)
        got, expected = tuple(out.shape), tuple(z.shape)
        if len(got) != len(expected) or any(
                a is not None and b is not None and a != b for a, b in zip(got, expected)):
            name = getattr(self.dynamics, "name", type(self.dynamics).__name__)
            raise ValueError(
                f"{self.name}: dynamics {name!r} returned shape {got} for input of "
                f"shape {expected}; dz/dt must have z's shape")
        return out

    def _noise(self, x):
        shape = ops.shape(x)
        per_replica = distribute.replica_noise(self.noise, shape, x.dtype, self.seed_generator)
        if per_replica is not None:
            return per_replica
        if self.noise == "gaussian":
            return keras.random.normal(shape, dtype=x.dtype, seed=self.seed_generator)
        bits = keras.random.randint(shape, 0, 2, seed=self.seed_generator)
        return ops.cast(2 * bits - 1, x.dtype)

    def _record_backward(self, stats):
        self.stats["backward_nfe"].assign(stats["nfe"])

    def compute_output_shape(self, input_shape):
        return tuple(input_shape), tuple(input_shape[:1])

    def get_config(self):
        config = super().get_config()
        train, ev = self.train_solver, self.eval_solver
        config.update(
            dynamics=keras.saving.serialize_keras_object(self.dynamics),
            trace=self.trace, noise=self.noise, T=self.T, seed=self.seed,
            eval_method=ev["method"], eval_rtol=ev["rtol"], eval_atol=ev["atol"],
            eval_step_size=ev["step_size"], eval_trace=self.eval_trace,
            **train,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["dynamics"] = keras.saving.deserialize_keras_object(config["dynamics"])
        return cls(**config)
