"""Learning-rate schedules of the paper's recipes."""

import keras
from keras import ops

from keras_rnode import checks


@keras.saving.register_keras_serializable(package="keras_rnode")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """lr * min(1, (step + 1) / warmup_steps): FFJORD's and RNODE's warm-up, then constant.

    The paper trains MNIST with Adam at 1e-3 and 1000 warm-up steps. The
    first step already uses lr / warmup_steps, never zero.
    """

    def __init__(self, learning_rate, warmup_steps):
        self.learning_rate = checks.positive_finite(learning_rate, "learning_rate")
        self.warmup_steps = checks.integer(warmup_steps, "warmup_steps", minimum=0)

    def __call__(self, step):
        if self.warmup_steps == 0:
            return ops.convert_to_tensor(self.learning_rate, "float32")
        fraction = (ops.cast(step, "float32") + 1.0) / self.warmup_steps
        return self.learning_rate * ops.minimum(1.0, fraction)

    def get_config(self):
        return {"learning_rate": self.learning_rate, "warmup_steps": self.warmup_steps}
