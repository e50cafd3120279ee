"""An optimizer wrapper that applies only finite gradients (and optionally only after good solves).

A diverging neural ODE produces one NaN/inf loss or gradient and, applied,
that step ruins the weights and the optimizer's moments for good.
`SkipBadSteps` leaves weights and optimizer state untouched on such a step
and counts it. It reuses Keras's `LossScaleOptimizer`, whose apply is
already a backend-neutral `ops.cond` on the gradients' finiteness (and
handles tf.distribute's cross-replica case), with the loss scale pinned
to 1 so the numbers are those of the inner optimizer.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_rnode")
class SkipBadSteps(keras.optimizers.LossScaleOptimizer):
    """Apply `inner_optimizer` only on steps whose gradients are all finite.

    Args:
        inner_optimizer: the optimizer doing the work (e.g. Adam).
        guard: optional callable returning a scalar boolean tensor; when it
            is False the step is skipped too. `RNODE.solves_succeeded` skips
            steps whose solve hit max_steps. Read inside the train step, so
            set it before the first `fit`; it is not serialized.

    `skipped` counts the skipped steps (a non-trainable int variable, saved
    with the optimizer). A skipped step does not advance `iterations`.
    """

    def __init__(self, inner_optimizer, guard=None, name=None, **kwargs):
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise ValueError("SkipBadSteps wraps a keras.optimizers.Optimizer, got "
                             f"{type(inner_optimizer).__name__}")
        if guard is not None and not callable(guard):
            raise ValueError(f"guard must be callable or None, got {type(guard).__name__}")
        kwargs.pop("initial_scale", None)
        kwargs.pop("dynamic_growth_steps", None)
        super().__init__(inner_optimizer, initial_scale=1.0, name=name, **kwargs)
        self.guard = guard

    def build(self, var_list):
        super().build(var_list)
        self.skipped = self.add_variable(shape=(), dtype="int", initializer="zeros",
                                         aggregation="none", name="skipped")

    def scale_loss(self, loss):
        return loss

    def check_finite(self, grads):
        ok = super().check_finite(grads)
        if self.guard is not None:
            ok = ops.logical_and(ok, ops.convert_to_tensor(self.guard(), "bool"))
        return ok

    # No scaling: finite steps go straight to the inner optimizer, bad ones
    # only count. These four override private LossScaleOptimizer hooks, and
    # `_variables` is its private list: tests/test_keras_private_api.py
    # checks they are still there with these parameters.
    def _stateful_handle_finite_grads(self, grads, trainable_variables):
        self.inner_optimizer.apply(grads, trainable_variables=trainable_variables)

    def _stateful_handle_non_finite_grads(self):
        self.skipped.assign_add(1)

    def _stateless_handle_finite_grads(self, optimizer_variables, grads,
                                       trainable_variables):
        own = list(optimizer_variables[:len(self._variables)])
        new_trainable, new_inner = self.inner_optimizer.stateless_apply(
            optimizer_variables[len(self._variables):], grads, trainable_variables)
        return new_trainable, own + list(new_inner)

    def _stateless_handle_non_finite_grads(self, optimizer_variables, trainable_variables):
        mapping = list(zip(self.variables, optimizer_variables))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            self.skipped.assign_add(1)
        return trainable_variables, [scope.get_current_value(v) for v in self.variables]

    def get_config(self):
        config = super().get_config()
        config.pop("initial_scale", None)
        config.pop("dynamic_growth_steps", None)
        return config
