"""Several machines, played on one: two worker processes of a MultiWorkerMirroredStrategy.

Each worker is a fresh Python process given its TF_CONFIG (127.0.0.1 and
free ports only), started with a deadline and killed, with its whole
process group, whatever happens. One step of two workers must equal the
single-process step on the combined batch; `rnode train --workers` must
write the run directory from the chief alone; and a worker killed in the
middle must end the other's run with a clear message, not a hang.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from click.testing import CliRunner

from keras_rnode.cli import main
from keras_rnode.resumable import StepBackup
from tests.backend_utils import assert_same_step

pytestmark = pytest.mark.filterwarnings("ignore")

# A noise-free model (exact trace, fixed-step RK4, continuous data) and SGD:
# the weights' change after one step is -lr * gradient.
MODEL = textwrap.dedent('''
    import keras, numpy as np
    import keras_rnode as kr

    def make():
        keras.utils.set_random_seed(0)
        cnf = kr.layers.CNF(kr.layers.ConcatSquashMLP(hidden=(16, 16), zero_init_last=False),
                            trace="exact", method="rk4", step_size=0.25, gradient="direct")
        model = kr.RNODE([cnf], kinetic=0.1, jacobian=0.1)
        model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=False)
        model.build((None, 2))
        return model

    def one_step(model):
        x = kr.datasets.toy("pinwheel", 64, seed=0)
        before = [np.array(w) for w in model.trainable_weights]
        h = model.fit(kr.datasets.make_dataset(x, 64, shuffle=False), epochs=1,
                      verbose=0).history
        after = [np.array(w) for w in model.trainable_weights]
        return {"loss": h["loss"][0], "nll": h["nll"][0], "kinetic": h["kinetic"][0],
                "step": [(a - b).ravel().tolist() for a, b in zip(after, before)]}
''')

# The README's command for each host, but for TF_CONFIG and --out: run on
# host i with TF_CONFIG naming both hosts and this one as task i.
TRAIN = ["train", "--workers", "--dataset", "8gaussians", "--hidden", "16,16",
         "--batch-size", "64", "--n-train", "256", "--n-test", "128", "--method", "rk4",
         "--step-size", "0.5", "--eval-method", "rk4", "--eval-step-size", "0.5", "--quiet"]

WORKER = textwrap.dedent('''
    import json, sys
    from keras_rnode.backend.distribute import multi_worker_strategy
    strategy = multi_worker_strategy(timeout_seconds=120)  # before other TensorFlow work
    {model}
    with strategy.scope():
        model = make()
    print("RESULT " + json.dumps({{"replicas": strategy.num_replicas_in_sync,
                                   **one_step(model)}}), flush=True)
    from keras_rnode.cli import main
    main(sys.argv[1:])
''')


def free_ports(n):
    """n ports of 127.0.0.1 free now (held open together, so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(ports, index):
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


@contextlib.contextmanager
def workers(argv, tmp_path, n=2):
    """n worker processes running `argv`, each with its TF_CONFIG, TMPDIR (tmp_path/tmpI)
    and output file (tmp_path/workerI.log); every one is killed on the way out."""
    ports = free_ports(n)
    procs = []
    tmp_path.mkdir(exist_ok=True)
    try:
        for i in range(n):
            tmp = tmp_path / f"tmp{i}"
            tmp.mkdir()
            env = dict(os.environ, TF_CONFIG=tf_config(ports, i), TMPDIR=str(tmp),
                       TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
            with open(tmp_path / f"worker{i}.log", "w") as log:
                procs.append(subprocess.Popen(argv, env=env, stdout=log,
                                              stderr=subprocess.STDOUT,
                                              start_new_session=True))
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_all(procs, timeout):
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.wait(timeout=max(deadline - time.monotonic(), 1))
    return [proc.returncode for proc in procs]


def log(tmp_path, i):
    return (tmp_path / f"worker{i}.log").read_text()


@pytest.mark.slow  # two TensorFlow processes: 72 s on this 2-core machine under load
def test_two_workers_step_equals_one_process_step_and_only_the_chief_writes(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-c", WORKER.format(model=MODEL), *TRAIN, "--steps", "2",
            "--out", str(out)]
    with workers(argv, tmp_path) as procs:
        codes = wait_all(procs, timeout=400)
    assert codes == [0, 0], log(tmp_path, 0)[-3000:] + log(tmp_path, 1)[-3000:]

    # The same model and batch in this process, on one device.
    namespace = {}
    exec(MODEL, namespace)
    one = namespace["one_step"](namespace["make"]())
    results = [json.loads(log(tmp_path, i).split("RESULT ", 1)[1].splitlines()[0])
               for i in range(2)]
    for two in results:
        assert two["replicas"] == 2
        assert_same_step(one, two)

    # rnode train --workers: the chief's run directory, and nothing from worker 1,
    # whose scratch directory (in its TMPDIR) is gone.
    assert sorted(os.listdir(out)) == ["config.json", "density.png", "history.json",
                                       "metrics.json", "model.keras"]
    assert json.loads((out / "config.json").read_text())["workers"] is True
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(metrics["test"]["nll"]) and len(metrics["train"]) > 0
    assert os.listdir(tmp_path / "tmp1") == []
    assert f"run directory: {out}" in log(tmp_path, 1)


def test_workers_need_a_cluster_description(monkeypatch, tmp_path):
    out = str(tmp_path / "run")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    result = CliRunner().invoke(main, [*TRAIN, "--steps", "1", "--out", out])
    assert result.exit_code == 1 and "TF_CONFIG" in result.output, result.output
    monkeypatch.setenv("TF_CONFIG", "{bad")
    result = CliRunner().invoke(main, [*TRAIN, "--steps", "1", "--out", out])
    assert result.exit_code == 1 and "not a cluster and task" in result.output, result.output
    result = CliRunner().invoke(main, [*TRAIN, "--devices", "2", "--out", out])
    assert result.exit_code == 2 and "--workers or --devices" in result.output, result.output


@pytest.mark.slow
def test_a_killed_worker_ends_the_run_with_a_message(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "keras_rnode.cli", *TRAIN, "--steps", "10000",
            "--checkpoint-every", "1", "--out", str(out)]
    with workers(argv, tmp_path) as procs:
        backup = str(out / "checkpoint")
        deadline = time.monotonic() + 300
        while (StepBackup.resume_step(backup) or 0) < 2:
            assert all(p.poll() is None for p in procs), log(tmp_path, 0)[-3000:]
            assert time.monotonic() < deadline, "the workers never trained"
            time.sleep(0.1)
        os.killpg(procs[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        chief = procs[0]
        chief.wait(timeout=300)
        took = time.monotonic() - killed
    text = log(tmp_path, 0)
    assert chief.returncode == 1, text[-3000:]
    assert "a worker of the cluster stopped answering" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    print(f"the chief ended {took:.1f} s after worker 1 was killed")


@pytest.mark.slow
def test_killed_workers_resume_to_the_weights_of_an_uninterrupted_run(tmp_path):
    """Both workers killed mid-run; `rnode train --resume --workers` on each continues from
    the chief's checkpoint (the other worker copies it: --out is reachable from both)."""
    from keras_rnode.runs import load_model

    args = [sys.executable, "-m", "keras_rnode.cli", *TRAIN, "--trace", "hutchinson",
            "--steps", "12", "--checkpoint-every", "2"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    with workers([*args, "--out", str(whole)], tmp_path / "a") as procs:
        assert wait_all(procs, timeout=400) == [0, 0], log(tmp_path / "a", 0)[-3000:]
    with workers([*args, "--out", str(killed)], tmp_path / "b") as procs:
        backup = str(killed / "checkpoint")
        deadline = time.monotonic() + 300
        while (StepBackup.resume_step(backup) or 0) < 4:
            assert all(p.poll() is None for p in procs), log(tmp_path / "b", 0)[-3000:]
            assert time.monotonic() < deadline, "the workers never trained"
            time.sleep(0.05)
    resume = [sys.executable, "-m", "keras_rnode.cli", "train", "--resume", "--workers",
              "--out", str(killed)]
    with workers(resume, tmp_path / "c") as procs:
        assert wait_all(procs, timeout=400) == [0, 0], log(tmp_path / "c", 1)[-3000:]
    metrics = json.loads((killed / "metrics.json").read_text())
    assert 4 <= metrics["resumed_from_step"] < 12
    for a, b in zip(load_model(whole).weights, load_model(killed).weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_the_cluster_and_a_lost_worker_read_plainly(monkeypatch):
    import tensorflow as tf

    from keras_rnode.backend import distribute

    for spec, index, expected in (({"worker": ["a:1", "b:1"]}, 1, (1, 2)),
                                  ({"chief": ["a:1"], "worker": ["b:1"]}, 0, (1, 2))):
        monkeypatch.setenv("TF_CONFIG", json.dumps(
            {"cluster": spec, "task": {"type": "worker", "index": index}}))
        assert distribute.cluster() == expected and not distribute.is_chief()
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"chief": ["a:1"], "worker": ["b:1"]}, "task": {"type": "chief", "index": 0}}))
    assert distribute.is_chief()
    monkeypatch.setenv("TF_CONFIG", tf_config([1, 2], 2))
    with pytest.raises(ValueError, match="not in its cluster"):
        distribute.cluster()
    # TensorFlow's error, without the trace of where the collective was defined.
    err = tf.errors.UnavailableError(None, None, (
        "Graph execution error:\n\nDetected at node x defined at (most recent call last):\n"
        '  File "a.py", line 1, in f\n\nCollective ops is aborted by: task 1 is unhealthy\n'
        "\t [[{{node x}}]] [Op:__inference_step]"))
    message = distribute.lost_worker(err, hint="Start again.")
    assert message.startswith("a worker of the cluster stopped answering")
    assert message.endswith("Start again. TensorFlow: UnavailableError: Collective ops is "
                            "aborted by: task 1 is unhealthy"), message
    assert distribute.lost_worker(ValueError("no")) is None
