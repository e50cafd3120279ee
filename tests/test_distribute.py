"""Data-parallel training: one step on two logical CPU devices equals one step on one.

The CPU split must happen before TensorFlow initializes its devices, which
this test process has long done; so each check runs in a fresh Python
process. The model is noise-free (exact trace, fixed-step RK4, continuous
data): the replicas' gradients, all-reduced, must then give the same step as
the whole batch on one device, up to float32 summation order. (With the
Hutchinson trace they must not: each replica draws its own probes.)
Under KERAS_BACKEND=jax the same holds for keras.distribution.DataParallel
on two host devices (XLA_FLAGS, read as JAX starts: a fresh process too),
and there for the Hutchinson trace as well.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.backend_utils import assert_same_step

pytestmark = pytest.mark.filterwarnings("ignore")

SCRIPT = textwrap.dedent('''
    import json, sys
    from keras_rnode.backend.distribute import mirrored_strategy
    strategy = mirrored_strategy(2)  # before anything else touches TensorFlow
    import keras, numpy as np, tensorflow as tf
    import keras_rnode as kr

    def make():
        keras.utils.set_random_seed(0)
        cnf = kr.layers.CNF(kr.layers.ConcatSquashMLP(hidden=(16, 16), zero_init_last=False),
                            trace="exact", method="rk4", step_size=0.25, gradient="direct")
        model = kr.RNODE([cnf], kinetic=0.1, jacobian=0.1)
        model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=False)
        model.build((None, 2))
        return model

    x = kr.datasets.toy("pinwheel", 64, seed=0)
    data = lambda: kr.datasets.make_dataset(x, 64, shuffle=False)
    out = {"replicas": strategy.num_replicas_in_sync,
           "devices": [d for d in strategy.extended.worker_devices]}
    for name, scope in (("one", None), ("two", strategy)):
        if scope is None:
            model = make()
        else:
            with scope.scope():
                model = make()
        before = [np.array(w) for w in model.trainable_weights]
        h = model.fit(data(), epochs=1, verbose=0).history
        after = [np.array(w) for w in model.trainable_weights]
        out[name] = {"loss": h["loss"][0], "nll": h["nll"][0], "kinetic": h["kinetic"][0],
                     "step": [(a - b).ravel().tolist() for a, b in zip(after, before)]}
    print("RESULT " + json.dumps(out))
''')


def run_python(code, timeout=300, env=None):
    env = dict(env or os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_two_device_step_equals_one_device_step():
    out = run_python(SCRIPT)
    result = json.loads(out.split("RESULT ", 1)[1])
    assert result["replicas"] == 2 and len(set(result["devices"])) == 2
    assert_same_step(result["one"], result["two"])


NOISE_SCRIPT = textwrap.dedent('''
    import json
    from keras_rnode.backend.distribute import mirrored_strategy
    strategy = mirrored_strategy(2)
    import numpy as np, tensorflow as tf
    from keras_rnode.layers import CNF, ConcatSquashMLP

    x = np.zeros((256, 8), "float32")
    out = {}
    for noise in ("gaussian", "rademacher"):
        single = CNF(ConcatSquashMLP(hidden=(4,)), noise=noise, seed=7)
        with strategy.scope():
            mirrored = CNF(ConcatSquashMLP(hidden=(4,)), noise=noise, seed=7)
        draw = tf.function(mirrored._noise)
        out[noise] = {
            "single": [np.asarray(single._noise(x)).tolist() for _ in range(2)],
            "replicas": [[np.asarray(v).tolist() for v in strategy.experimental_local_results(
                strategy.run(draw, args=(x,)))] for _ in range(2)],
        }
    print("RESULT " + json.dumps(out))
''')


def _reference_draw(noise, shape, seed, counter):
    """The draw before replicas had noise of their own: Keras's stateless op at [seed, counter]."""
    import tensorflow as tf

    seed = tf.constant([seed, counter], tf.int32)
    if noise == "gaussian":
        return tf.random.stateless_normal(shape, seed).numpy()
    return 2.0 * tf.random.stateless_uniform(shape, seed, 0, 2, tf.int32).numpy() - 1.0


def test_replicas_draw_their_own_hutchinson_noise():
    result = json.loads(run_python(NOISE_SCRIPT, timeout=600).split("RESULT ", 1)[1])
    for noise, draws in result.items():
        # One device: the draw is what it always was, call after call.
        for counter, single in enumerate(draws["single"]):
            np.testing.assert_array_equal(single, _reference_draw(noise, (256, 8), 7, counter),
                                          err_msg=noise)
        for step, (first, second) in enumerate(draws["replicas"]):
            first, second = np.asarray(first).ravel(), np.asarray(second).ravel()
            # Independent: uncorrelated (sd of the sample correlation: 1 / sqrt(2048) = 0.022).
            assert abs(np.corrcoef(first, second)[0, 1]) < 0.1, (noise, step)
            for v in (first, second):
                if noise == "gaussian":
                    assert abs(v.mean()) < 0.1 and abs(v.std() - 1.0) < 0.1, (noise, step)
                else:
                    assert set(np.unique(v)) == {-1.0, 1.0}, (noise, step)
                    assert abs(v.mean()) < 0.1, (noise, step)
        # And fresh at every step, as on one device.
        for replica in range(2):
            a, b = (np.asarray(draws["replicas"][s][replica]).ravel() for s in range(2))
            assert abs(np.corrcoef(a, b)[0, 1]) < 0.1, (noise, replica)


@pytest.mark.slow  # 20 s; the two-device step itself is checked in the default suite above
def test_rnode_train_on_two_devices(tmp_path):
    out = tmp_path / "run"
    code = textwrap.dedent(f'''
        import sys
        from keras_rnode.cli import main
        sys.exit(main(["train", "--dataset", "8gaussians", "--hidden", "16,16", "--steps",
                       "2", "--batch-size", "64", "--n-train", "256", "--n-test", "128",
                       "--method", "rk4", "--step-size", "0.5", "--eval-method", "rk4",
                       "--eval-step-size", "0.5", "--devices", "2", "--warmup-steps", "10",
                       "--quiet", "--out", {str(out)!r}]))
    ''')
    stdout = run_python(code)
    assert "nll" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["devices"] == 2 and config["warmup_steps"] == 10
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(metrics["test"]["nll"])


# ------------------------------------------------------------------- JAX --

JAX_SCRIPT = textwrap.dedent('''
    import json
    import jax, keras, numpy as np
    import keras_rnode as kr
    from keras_rnode.backend.distribute import data_parallel

    def make():
        keras.utils.set_random_seed(0)
        cnf = kr.layers.CNF(kr.layers.ConcatSquashMLP(hidden=(16, 16), zero_init_last=False),
                            trace="hutchinson", method="rk4", step_size=0.25,
                            gradient="direct", seed=3)
        model = kr.RNODE([cnf], kinetic=0.1, jacobian=0.1)
        model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=True)
        model.build((None, 2))
        return model

    x = kr.datasets.toy("pinwheel", 64, seed=0)
    out = {"devices": len(jax.devices())}
    for name in ("one", "two"):
        if name == "two":
            data_parallel(2)  # keras.distribution.DataParallel over both host devices
        model = make()
        before = [np.array(w) for w in model.trainable_weights]
        h = model.fit(kr.datasets.make_dataset(x, 64, shuffle=False), epochs=1,
                      verbose=0).history
        after = [np.array(w) for w in model.trainable_weights]
        out[name] = {
            "loss": h["loss"][0], "nll": h["nll"][0], "kinetic": h["kinetic"][0],
            "step": [(a - b).ravel().tolist() for a, b in zip(after, before)],
            "shards": len(model.trainable_weights[0].value.sharding.device_set)}
    print("RESULT " + json.dumps(out))
''')

jax_only = pytest.mark.skipif(os.environ.get("KERAS_BACKEND") != "jax",
                              reason="JAX's DataParallel: run with KERAS_BACKEND=jax")


@pytest.mark.backends
@jax_only
def test_jax_two_device_step_equals_one_device_step():
    """keras.distribution.DataParallel on two host devices. The step is one program over
    the global batch, so one draw of the Hutchinson probes gives each sample, and so
    each device's rows, probes of its own: the same as on one device. So the steps
    agree for the Hutchinson trace too (were the devices' probes the same, they could
    not)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = json.loads(run_python(JAX_SCRIPT, env=env).split("RESULT ", 1)[1])
    assert result["devices"] == 2
    one, two = result["one"], result["two"]
    assert one["shards"] == 1 and two["shards"] == 2  # the weights replicated on both devices
    assert_same_step(one, two)


@pytest.mark.slow  # 44 s on this 2-core machine under load
@pytest.mark.backends
@jax_only
def test_rnode_train_on_two_jax_devices(tmp_path):
    """--devices 2 under JAX: the CPU is split for JAX (no XLA_FLAGS given)."""
    test_rnode_train_on_two_devices(tmp_path)
