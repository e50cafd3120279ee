"""Learning-rate schedules of the paper's recipes."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_rnode")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """lr * min(1, (step + 1) / warmup_steps): FFJORD's and RNODE's warm-up, then constant.

    The paper trains MNIST with Adam at 1e-3 and 1000 warm-up steps. The
    first step already uses lr / warmup_steps, never zero.
    """

    def __init__(self, learning_rate, warmup_steps):
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {learning_rate!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        self.learning_rate = float(learning_rate)
        self.warmup_steps = warmup_steps

    def __call__(self, step):
        if self.warmup_steps == 0:
            return ops.convert_to_tensor(self.learning_rate, "float32")
        fraction = (ops.cast(step, "float32") + 1.0) / self.warmup_steps
        return self.learning_rate * ops.minimum(1.0, fraction)

    def get_config(self):
        return {"learning_rate": self.learning_rate, "warmup_steps": self.warmup_steps}
