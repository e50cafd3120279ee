"""Data-parallel training on TensorFlow: tf.distribute strategies and the loss scaling they need.

One host, several devices: `mirrored_strategy(n)` gives a
`tf.distribute.MirroredStrategy` over n GPUs, or over n logical CPU devices
split from the CPU when fewer GPUs exist (`split_cpu`, which must run
before TensorFlow initializes its devices). Build and compile the model
under `strategy.scope()`; `model.fit` then splits each global batch across
the replicas and all-reduces the gradients.

Several hosts: `tf.distribute.MultiWorkerMirroredStrategy()` in place of
the mirrored one; the code is otherwise the same. Each worker runs the
same program with the cluster described by the TF_CONFIG environment
variable, e.g. on worker 0 of two:
{"cluster": {"worker": ["host0:12345", "host1:12345"]}, "task": {"type": "worker", "index": 0}}
Only worker 0 should write the run directory.

On JAX the route is Keras's own distribution API
(`keras.distribution.set_distribution(keras.distribution.DataParallel())`),
not this module. TensorFlow is imported inside the functions so that the
module can be imported under any backend.
"""

import keras


def split_cpu(n):
    """Split the first physical CPU into n logical devices; returns their names.

    Raises RuntimeError with a clear message when TensorFlow has already
    initialized its devices (the split must come first in the process).
    """
    import tensorflow as tf

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of devices must be a positive integer, got {n!r}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    existing = tf.config.get_logical_device_configuration(cpu)
    if existing is None or len(existing) != n:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
        except RuntimeError as err:
            raise RuntimeError(
                f"cannot split the CPU into {n} devices: TensorFlow has already "
                "initialized its devices in this process; configure devices before "
                "any TensorFlow work") from err
    return [d.name for d in tf.config.list_logical_devices("CPU")][:n]


def mirrored_strategy(n):
    """A MirroredStrategy over n devices: GPUs when there are n, else n logical CPUs."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) >= n:
        devices = [f"/gpu:{i}" for i in range(n)]
        cross_device_ops = None  # NCCL all-reduce, the default on GPUs
    else:
        devices = split_cpu(n)
        # NCCL is GPU-only; on CPUs reduce through host memory.
        cross_device_ops = tf.distribute.ReductionToOneDevice()
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=cross_device_ops)


def replica_count():
    """Replicas of the strategy in scope (1 outside any strategy or off TensorFlow)."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


def replica_noise(kind, shape, dtype, seed_generator):
    """This replica's Hutchinson probes ("gaussian" or "rademacher"), or None with one replica.

    Every replica of a MirroredStrategy runs the step from the same seed
    state, so the seed generator alone would give them all the same
    probes: their estimates would be correlated, and averaging the
    replicas' gradients would not average the noise away. The replica id
    is folded into the drawn seed instead. With one replica (no strategy,
    a cross-replica call, or off TensorFlow) None: the caller draws as it
    always has, so single-device runs keep their noise bit for bit.
    """
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    # Keras's own reduction of its int64 seed state to the int32 pair the
    # stateless ops take under XLA.
    seed = tf.cast(tf.math.floormod(seed_generator.next(), tf.int32.max - 1), tf.int32)
    seed = tf.random.experimental.stateless_fold_in(seed, context.replica_id_in_sync_group)
    if kind == "gaussian":
        return tf.random.stateless_normal(shape, seed, dtype=dtype)
    bits = tf.random.stateless_uniform(shape, seed, minval=0, maxval=2, dtype=tf.int32)
    return tf.cast(2 * bits - 1, dtype)


def scale_loss(loss):
    """A per-replica mean loss divided by the replica count.

    Each replica's gradient is summed by the all-reduce, so the sum of the
    scaled per-replica means is the global batch's mean: the gradient of a
    step equals the single-device one. Keras does this for losses given to
    compile(); a model computing its own loss must do it itself.
    """
    n = replica_count()
    return loss if n == 1 else loss * (1.0 / n)


def supports_jit(strategy):
    """False for a strategy over logical CPU devices: XLA compiles one training step
    for one device and then cannot reach the other replicas' variables
    ("Trying to access resource ... located in device CPU:1 from CPU:0")."""
    return not any("CPU" in d.upper() for d in strategy.extended.worker_devices)
