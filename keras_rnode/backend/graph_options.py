"""TensorFlow graph-mode settings that training needs (imported lazily, TensorFlow only)."""

import keras


def avoid_addn_rewrite_race():
    """Turn off Grappler's graph rewrites for graph-mode (non-XLA) training.

    Seen with TF 2.21 on CPU: the multiscale model's training step at batch
    200 (digits, 32-channel conv dynamics) fails on its second step with
    AlreadyExistsError "... while_1/AddN_36/tmp_var/frame:...iter:4 ...
    TemporaryVariableOp": a rewrite turns a large AddN inside the solver's
    gradient loop into an in-place accumulation whose temporary variable
    clashes between parallel loop iterations (TensorFlow issues 37740,
    23780, 33713). Turning off arithmetic_optimization alone does not help;
    turning off the meta-optimizer does. Process-wide; call before the
    training step is traced. No effect off TensorFlow or under XLA.
    """
    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
