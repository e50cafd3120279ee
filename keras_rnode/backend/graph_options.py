"""TensorFlow graph-mode settings that training needs (imported lazily, TensorFlow only)."""

import keras


def avoid_addn_rewrite_race():
    """Turn off Grappler's graph rewrites for graph-mode (non-XLA) training.

    Seen with TF 2.21 on CPU: the multiscale model's training step at batch
    200 (digits, 32-channel conv dynamics) fails on its second step with
    AlreadyExistsError "... while_1/AddN_36/tmp_var/frame:...iter:4 ...
    TemporaryVariableOp" (TensorFlow issues 37740, 23780, 33713).

    The rewrite is the memory optimizer's scheduling pass: it replaces an
    AddN of more than two inputs by TemporaryVariable + AssignAdd +
    DestroyTemporaryVariable when the static estimate of peak memory
    exceeds 80% of the device's memory (so it depends on the batch and on
    the machine's free RAM). The variable is created behind a control edge
    from one AddN input only. The evidence (the first step passes, the
    second fails, at iter:4: the exiting iteration of a loop over RK4's
    four steps) says that input runs in the loop's exiting iteration where
    the accumulations and the destroy do not, so one variable leaks per
    call into the eager step container ("__per_step_0"), where the next
    call's finds it. Tried and not enough: parallel_iterations=1 on the solver's
    loops (same error), arithmetic_optimization off (same error). The
    memory optimizer cannot be turned off alone through
    tf.config.optimizer, so the meta-optimizer goes. Process-wide; call
    before the training step is traced. No effect off TensorFlow or under
    XLA.
    """
    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
