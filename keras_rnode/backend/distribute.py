"""Data-parallel training: tf.distribute strategies (one host or several), JAX's DataParallel,
and the loss scaling and input they need.

One host, several devices: `mirrored_strategy(n)` gives a
`tf.distribute.MirroredStrategy` over n GPUs, or over n logical CPU devices
split from the CPU when fewer GPUs exist (`split_cpu`, which must run
before TensorFlow initializes its devices). Build and compile the model
under `strategy.scope()`; `model.fit` then splits each global batch across
the replicas and all-reduces the gradients.

Several hosts: `multi_worker_strategy()`, a
`tf.distribute.MultiWorkerMirroredStrategy`, in place of the mirrored one;
the code is otherwise the same. Each worker is a process that runs the
same program with the cluster described by the TF_CONFIG environment
variable, e.g. on worker 0 of two:
{"cluster": {"worker": ["host0:12345", "host1:12345"]}, "task": {"type": "worker", "index": 0}}
Worker 0 (the chief, `is_chief()`) writes the run directory; the others do
the same work, collectives included, into a scratch directory of their
own, as TensorFlow's multi-worker guide recommends. A worker that dies
ends the others' next collective within `timeout_seconds` (TensorFlow's
coordination service, which watches the workers' heartbeats, usually
notices within seconds); `lost_worker` turns that error into a message.

On JAX the route is Keras's own distribution API: `data_parallel(n)` sets
`keras.distribution.DataParallel` over n devices (GPUs, or the CPU shown
to JAX as n devices, `jax_num_cpu_devices`, before JAX starts); the train
step is then one SPMD program over the global batch, each device holding
its share of the rows. `data_parallel` is the one entry the run code
calls, for either backend. TensorFlow and JAX are imported inside the
functions so that the module can be imported under any backend.
"""

import json
import os

import keras

# Seconds a collective (all-reduce, broadcast) may wait for the other workers
# before the run fails: longer than any step, evaluation or compilation, and
# than the workers' start-up skew (the first collective waits for them all).
WORKER_TIMEOUT = 600
_MULTI_WORKER = {}  # the one MultiWorkerMirroredStrategy a process may make


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


def data_parallel(devices=1, workers=False):
    """Set up data-parallel training; returns the tf.distribute strategy whose scope the
    model must be built in, or None (one device, or JAX: Keras's distribution is global).

    TensorFlow: a MirroredStrategy over `devices` devices, or with
    `workers` the MultiWorkerMirroredStrategy of TF_CONFIG's cluster. JAX:
    `keras.distribution.DataParallel` over `devices` devices (not
    `workers`). PyTorch: one device only. Call it before any other
    TensorFlow or JAX work. Raises RuntimeError when the devices cannot be
    had, ValueError for a bad TF_CONFIG or request.
    """
    backend = keras.backend.backend()
    if workers:
        if backend != "tensorflow":
            raise ValueError("multi-worker training runs on the TensorFlow backend; "
                             f"KERAS_BACKEND is {backend!r}")
        if devices != 1:
            raise ValueError("give --workers or --devices, not both: each worker trains on "
                             "all its GPUs, or its CPU")
        return multi_worker_strategy()
    if devices == 1:
        return None
    if backend == "tensorflow":
        return mirrored_strategy(devices)
    if backend == "jax":
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax_devices(devices)))
        return None
    raise ValueError(f"data-parallel training (--devices {devices}) runs on the TensorFlow "
                     f"and JAX backends, not {backend!r}")


def jax_devices(n):
    """n JAX devices: the default platform's (GPUs), or the CPU split into n host devices.

    The split must come before JAX initializes its backends (XLA_FLAGS=
    --xla_force_host_platform_device_count=N does the same from outside).
    """
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        pass  # JAX is running already: its devices are what they are
    devices = jax.devices()
    if len(devices) < n:
        platform = devices[0].platform
        why = ("JAX started before its CPU could be split; set XLA_FLAGS="
               f"--xla_force_host_platform_device_count={n} before it starts"
               if platform == "cpu" else "ask for fewer")
        raise RuntimeError(f"JAX has {len(devices)} {platform.upper()} device(s), not {n}: "
                           f"{why}")
    return devices[:n]


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


def cluster():
    """(this worker's index, the number of workers) from TF_CONFIG; ValueError if it is
    missing or malformed. A "chief" task is index 0, the workers after it."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise ValueError("multi-worker training needs the TF_CONFIG environment variable, "
                         'e.g. {"cluster": {"worker": ["host0:12345", "host1:12345"]}, '
                         '"task": {"type": "worker", "index": 0}}')
    try:
        config = json.loads(text)
        spec, task = config["cluster"], config["task"]
        chiefs, workers = list(spec.get("chief", [])), list(spec.get("worker", []))
        kind, index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"TF_CONFIG is not a cluster and task description ({err}): "
                         f"{text!r}") from None
    hosts = {"chief": chiefs, "worker": workers}.get(kind)
    if hosts is None or not 0 <= index < len(hosts) or len(chiefs) > 1:
        raise ValueError(f"TF_CONFIG: task {kind!r} {index} is not in its cluster {spec}")
    return (index if kind == "chief" else len(chiefs) + index), len(chiefs) + len(workers)


def is_chief():
    """True in the worker that writes the run directory (TF_CONFIG's chief, or worker 0)."""
    return cluster()[0] == 0


def multi_worker_strategy(timeout_seconds=WORKER_TIMEOUT):
    """This process's MultiWorkerMirroredStrategy, over the cluster TF_CONFIG describes.

    Made once per process (TensorFlow configures its collectives once); call
    it before any other TensorFlow work, as the first collective waits for
    every worker to start. Each worker trains on its GPUs, or its CPU.
    Collectives give up after `timeout_seconds` (a dead or hung worker
    then ends the run instead of hanging it).
    """
    import tensorflow as tf

    cluster()  # a clear error for a missing or bad TF_CONFIG
    if "strategy" not in _MULTI_WORKER:
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=timeout_seconds)

        class MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
            """Keras 3's fit reduces each scalar log with `reduce("MEAN", log, axis=0)`
            across workers, which fails on a scalar ("Invalid reduction dimension 0
            for input with 0 dimensions", tensorflow/tensorflow#72388): a scalar
            is reduced across the replicas alone."""

            def reduce(self, reduce_op, value, axis):
                if axis is not None and all(
                        getattr(v, "shape", None) is not None and v.shape.rank == 0
                        for v in self.experimental_local_results(value)):
                    axis = None
                return super().reduce(reduce_op, value, axis)

        _MULTI_WORKER["strategy"] = MultiWorkerMirroredStrategy(communication_options=options)
    return _MULTI_WORKER["strategy"]


def lost_worker(err, hint=""):
    """A message for a collective that failed because a worker died or hung, else None;
    `hint` (what to do) goes before TensorFlow's own words."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    if not isinstance(err, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                            tf.errors.CancelledError)):
        return None
    # The error itself, without the "Detected at node ..." trace of where it was raised.
    lines = [line.strip() for line in str(getattr(err, "message", err)).splitlines()]
    skip = ("File ", "[[", "Detected at node", "Graph execution error", "Additional GRPC")
    detail = " ".join(line for line in lines if line and not line.startswith(skip))
    return ("a worker of the cluster stopped answering (it was killed, crashed or hung), so "
            "training cannot go on: every worker must run until the end. "
            f"{hint + ' ' if hint else ''}TensorFlow: {type(err).__name__}: {detail[:400]}")


def replica_count():
    """Replicas of the strategy in scope (1 outside any strategy or off TensorFlow)."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


def replica_random(seed_generator):
    """This replica's own random draws, or None with one replica: (normal, randint), called
    as keras.random's are but without a seed, drawing one seed from `seed_generator`.

    Every replica of a MirroredStrategy runs the step from the same seed
    state, so the seed generator alone would give them all the same
    Hutchinson probes: their estimates would be correlated, and averaging
    the replicas' gradients would not average the noise away. The replica
    id is folded into the drawn seed instead. With one replica (no
    strategy, a cross-replica call, or off TensorFlow) None: the caller
    draws from the generator as it always has, so single-device runs keep
    their noise bit for bit. JAX needs nothing here: under
    `keras.distribution.DataParallel` the step is one program over the
    global batch, so one draw gives every sample its own probe, each device
    the rows of its share (the same probes as on one device).
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

    def normal(shape, dtype):
        return tf.random.stateless_normal(shape, seed, dtype=dtype)

    def randint(shape, minval, maxval):
        return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval,
                                           dtype=tf.int32)

    return normal, randint


def fit_input(model, make_data, start):
    """The input for `model.fit` that trains on `make_data(start)`, the seeded stream from
    batch `start` on, as it is on one device.

    Keras's TensorFlow trainer, for a model made under a tf.distribute
    strategy, draws a batch from fit's input to build the model
    symbolically (`_maybe_symbolic_build`) and then trains on a second
    pass over the same tf.data object. A shuffled set reshuffles at each
    pass, by a count of passes that the first pass advanced as far as it
    read (further for a larger `start`), so a resumed run, two fits,
    would see other batches than an uninterrupted one. There every pass is
    made a fresh stream (a flat_map that builds it), the same batches as
    on one device. Reads the model's private `_distribute_strategy`
    (tests/test_keras_private_api.py).
    """
    if (keras.backend.backend() == "tensorflow"
            and getattr(model, "_distribute_strategy", None) is not None):
        import tensorflow as tf

        data = make_data(start)
        if isinstance(data, tf.data.Dataset):
            return tf.data.Dataset.from_tensors(0).flat_map(lambda _: make_data(start))
        return data
    return make_data(start)


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
