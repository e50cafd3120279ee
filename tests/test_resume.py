"""Interrupted runs: checkpoints every N steps, resume to the same weights, safe export."""

import json
import os
import signal
import subprocess
import sys
import time

import hypothesis
import hypothesis.strategies as st
import keras
import numpy as np
import pytest
from click.testing import CliRunner

import keras_rnode as kr
from keras_rnode import callbacks, runs
from keras_rnode.cli import main
from keras_rnode.datasets import make_dataset, toy
from keras_rnode.optimizers import SkipBadSteps
from keras_rnode.resumable import StepBackup, fit_resumable, phases
from keras_rnode.runs import load_model

# 256 points in batches of 64: 4 steps an epoch. Fast evaluation and picture; Euler
# steps, the cheapest solver to trace (these tests are about checkpoints, not solvers).
TINY = ["--dataset", "8gaussians", "--hidden", "8", "--batch-size", "64", "--n-train", "256",
        "--n-test", "64", "--method", "euler", "--step-size", "0.5", "--eval-method", "euler",
        "--eval-step-size", "0.5", "--eval-batch-size", "64", "--trace", "hutchinson",
        "--no-jit", "--quiet"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def model_weights(run):
    return [w.numpy() for w in load_model(run).weights]


class InterruptAt(keras.callbacks.Callback):
    """Ctrl-C after `step` steps of this fit, as a user would press it."""

    def __init__(self, step):
        super().__init__()
        self.step, self.seen = step, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.step:
            raise KeyboardInterrupt


def test_phases_finish_the_interrupted_epoch_first():
    assert phases(0, 4, 3) == [(0, 0, 3, 4)]
    assert phases(6, 4, 3) == [(6, 1, 2, 2), (8, 2, 3, 4)]
    assert phases(8, 4, 3) == [(8, 2, 3, 4)]
    assert phases(12, 4, 3) == []
    with pytest.raises(ValueError, match="outside"):
        phases(13, 4, 3)


def test_step_backup_is_still_importable_from_callbacks():
    # Its home moved to resumable.py; code written against keras_rnode.callbacks still runs.
    assert callbacks.StepBackup is StepBackup


def train_interrupted(monkeypatch, step, *args):
    """`rnode train ARGS` with Ctrl-C pressed after `step` training steps (BadSteps watches
    every step of either objective: flow matching has no solver watch)."""
    original = callbacks.BadSteps.on_train_batch_end
    seen = []

    def interrupt(self, batch, logs=None):
        seen.append(batch)
        if len(seen) == step:
            raise KeyboardInterrupt
        return original(self, batch, logs)

    monkeypatch.setattr(callbacks.BadSteps, "on_train_batch_end", interrupt)
    try:
        return invoke("train", *args)
    finally:
        monkeypatch.setattr(callbacks.BadSteps, "on_train_batch_end", original)


def test_cli_run_interrupted_mid_epoch_resumes_to_the_same_weights(tmp_path, monkeypatch):
    args = [*TINY, "--epochs", "3", "--checkpoint-every", "3"]
    whole = tmp_path / "whole"
    result = invoke("train", *args, "--out", whole)
    assert result.exit_code == 0, result.output
    assert not (whole / "checkpoint").exists()  # a finished run leaves no checkpoint

    # Ctrl-C after step 7 (epoch 2, step 3): the checkpoint of step 6 survives.
    cut = tmp_path / "cut"
    result = train_interrupted(monkeypatch, 7, *args, "--out", cut)
    assert result.exit_code == 130, result.output
    assert "--resume" in result.output and "step 6" in result.output
    assert not (cut / "model.keras").exists()

    result = invoke("train", *args, "--out", cut)
    assert result.exit_code == 1 and "interrupted run" in result.output
    result = invoke("train", "--resume", "--out", cut, "--lr", "0.5")
    assert result.exit_code == 2 and "drop --lr" in result.output

    result = invoke("train", "--resume", "--out", cut, "--quiet")
    assert result.exit_code == 0, result.output
    metrics = json.loads((cut / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 6
    for a, b in zip(model_weights(whole), model_weights(cut)):
        np.testing.assert_array_equal(a, b)


def test_stopped_run_keeps_its_last_good_weights_and_can_resume(tmp_path):
    """--on-nan stop: the model is written, the reason printed, the checkpoint kept."""
    x = np.random.default_rng(0).normal(size=(300, 2)).astype(np.float32)
    x[:, 0] *= 1e25  # finite data whose log-density overflows: every loss is inf
    np.save(tmp_path / "huge.npy", x)
    run = tmp_path / "run"
    args = [*TINY, "--dataset", tmp_path / "huge.npy", "--steps", "3", "--out", run]
    result = invoke("train", *args)
    assert result.exit_code == 1
    assert "training stopped: a NaN or inf loss or gradient at step 1" in result.output
    assert "--resume" in result.output
    initial = model_weights(run)  # the step was not applied
    assert json.loads((run / "metrics.json").read_text())["stopped"].startswith("a NaN")
    # Resuming may change what to do on trouble: skipping every step, it finishes.
    result = invoke("train", "--resume", "--out", run, "--on-nan", "skip")
    assert result.exit_code == 0, result.output
    assert not (run / "checkpoint").exists()
    assert json.loads((run / "history.json").read_text())["skipped_steps"] == [3]
    for a, b in zip(initial, model_weights(run)):
        np.testing.assert_array_equal(a, b)


def interrupting(monkeypatch, error):
    """The final evaluation raises `error` (Ctrl-C, a failed solve) once; returns the undo."""
    real = runs.held_out_quality

    def fail(*args, **kwargs):
        monkeypatch.setattr(runs, "held_out_quality", real)
        raise error

    monkeypatch.setattr(runs, "held_out_quality", fail)


def test_ctrl_c_in_the_final_evaluation_leaves_a_run_resume_finishes(tmp_path, monkeypatch):
    """It used to print `Aborted!` and leave model.keras alone: no checkpoint, config.json
    or figure, so neither a rerun, --resume, `rnode evaluate` nor `rnode sample
    --trajectories` could finish it."""
    run = tmp_path / "run"
    args = [*TINY, "--steps", "3", "--out", run]
    interrupting(monkeypatch, KeyboardInterrupt())
    result = invoke("train", *args)
    assert result.exit_code == 130, result.output
    assert "interrupted; training is done (step 3)" in result.output
    assert f"rnode train --resume --out {run}" in result.output
    # What evaluation needs is beside the model, and the checkpoint stays.
    assert {"config.json", "model.keras", "history.json", "checkpoint"} <= set(os.listdir(run))
    assert not (run / "metrics.json").exists()
    trained = model_weights(run)
    scored = invoke("evaluate", run, "--json")
    assert scored.exit_code == 0 and json.loads(scored.output)["n"] == 64, scored.output
    paths = invoke("sample", run, "-n", 5, "--trajectories", "--steps", 2, "--out",
                   tmp_path / "paths.npy")
    assert paths.exit_code == 0, paths.output
    assert "interrupted run" in invoke("train", *args).output

    result = invoke("train", "--resume", "--out", run)
    assert result.exit_code == 0, result.output
    assert "8gaussians test (64 points): nll" in result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 3 and metrics["test"]["n"] == 64
    assert np.isfinite(metrics["train"]["loss"])  # the training's own history, kept
    assert (run / "density.png").is_file() and not (run / "checkpoint").exists()
    for a, b in zip(trained, model_weights(run)):
        np.testing.assert_array_equal(a, b)

    # A finished run is left as it is: --resume can be rerun at no cost.
    before = (run / "model.keras").stat().st_mtime_ns
    again = invoke("train", "--resume", "--out", run)
    assert again.exit_code == 0 and "finished before; nothing to resume" in again.output
    assert (run / "model.keras").stat().st_mtime_ns == before
    assert "drop --lr" in invoke("train", "--resume", "--out", run, "--lr", "0.5").output
    longer = invoke("train", "--resume", "--out", run, "--steps", "50")
    assert longer.exit_code == 2 and "finished training by likelihood" in longer.output
    assert "To train longer, start a new run" in longer.output


def test_resume_says_what_is_missing(tmp_path):
    nowhere = tmp_path / "nowhere"
    result = invoke("train", "--resume", "--out", nowhere)
    assert result.exit_code == 1 and f"nothing to resume: {nowhere} does not exist" in result.output
    (tmp_path / "empty").mkdir()
    result = invoke("train", "--resume", "--out", tmp_path / "empty")
    assert result.exit_code == 1 and "holds no run (neither checkpoint" in result.output


def test_a_failed_final_evaluation_is_finished_with_other_evaluation_options(tmp_path,
                                                                             monkeypatch):
    run = tmp_path / "run"
    interrupting(monkeypatch, ValueError("the evaluation solve of batch 0 ended with status "
                                         "max_steps_reached"))
    result = invoke("train", *TINY, "--steps", "2", "--out", run)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "max_steps_reached" in result.output and f"rnode evaluate {run}" in result.output
    assert f"rnode train --resume --out {run}" in result.output
    assert {"config.json", "model.keras", "checkpoint"} <= set(os.listdir(run))
    # Evaluation options may be given anew; the others must agree with the run's.
    assert "drop --method" in invoke("train", "--resume", "--out", run, "--method",
                                     "rk4", "--step-size", "0.5").output
    result = invoke("train", "--resume", "--out", run, "--eval-method", "rk4",
                    "--eval-step-size", "0.25", "--n-test", "32")
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["solver"] == "rk4 step=0.25" and metrics["test"]["n"] == 32
    config = json.loads((run / "config.json").read_text())
    assert (config["eval_method"], config["eval_step_size"], config["method"]) == (
        "rk4", 0.25, "euler")


def legacy(path):
    """Rewrite an options or config file as runs wrote it before penalties went by name."""
    options = json.loads(path.read_text())
    options.update(options.pop("regularizers"))
    path.write_text(json.dumps(options))
    return options


def test_runs_written_with_flat_penalty_weights_resume_and_evaluate(tmp_path, monkeypatch):
    run = tmp_path / "old"
    args = [*TINY, "--steps", "4", "--checkpoint-every", "2", "--kinetic", "0.02"]
    assert train_interrupted(monkeypatch, 3, *args, "--out", run).exit_code == 130
    saved = legacy(run / "checkpoint" / "options.json")
    assert (saved["kinetic"], saved["jacobian"]) == (0.02, 0.01)

    result = invoke("train", "--resume", "--out", run, "--kinetic", "0.05")
    assert result.exit_code == 2 and "--kinetic was 0.02, drop --kinetic" in result.output
    result = invoke("train", "--resume", "--out", run, "--kinetic", "0.02", "--directional",
                    "0")
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert config["regularizers"] == {"kinetic": 0.02, "jacobian": 0.01}
    legacy(run / "config.json")
    assert invoke("evaluate", run).exit_code == 0
    assert invoke("train", "--resume", "--out", run).exit_code == 0


def test_fit_under_a_strategy_trains_on_the_stream_from_its_start():
    """Under a tf.distribute strategy Keras's fit reads a first pass of its input to build
    the model and trains on a second pass, which a shuffled stream reshuffles (by how far
    the first pass read). fit_input gives it a fresh stream at each pass: a fit from
    batch `start` trains on batches start, start + 1, ... of the one seeded stream."""
    import tensorflow as tf

    from keras_rnode.backend.distribute import fit_input

    x = np.arange(40, dtype="float32").reshape(20, 2)

    def stream(start):
        return make_dataset(x, 4, seed=0, repeat=True, start=start)

    expected = [b.numpy() for b in stream(0).take(10)]
    seen = []

    class Recorder(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

        def train_step(self, data):
            tf.py_function(lambda v: seen.append(v.numpy()), [data], [])
            return {"rows": tf.shape(data)[0]}

    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        model = Recorder()
        model.compile(optimizer="sgd")
        model.build((None, 2))
    for start in (0, 4):
        seen.clear()
        model.fit(fit_input(model, stream, start), steps_per_epoch=3, epochs=1, verbose=0)
        assert len(seen) == 3
        for got, want in zip(seen, expected[start:start + 3]):
            np.testing.assert_array_equal(got, want)


@pytest.mark.slow  # the CLI test above covers the same ground through rnode train
def test_library_resume_restores_weights_optimizer_and_noise(tmp_path):
    """fit_resumable directly: Hutchinson noise, Adam moments, the data stream."""
    x = toy("8gaussians", 256, seed=0)

    def run(backup, interrupt=None):
        keras.utils.set_random_seed(0)
        cnf = kr.layers.CNF(kr.layers.ConcatSquashMLP(hidden=(8,)), trace="hutchinson",
                            method="rk4", step_size=0.5, seed=0)
        model = kr.RNODE([cnf], seed=0)
        model(x[:2])
        model.compile(optimizer=SkipBadSteps(keras.optimizers.Adam(1e-2)), jit_compile=False)
        def stream(start):
            return make_dataset(x, 64, seed=0, repeat=True).skip(start)

        extra = [InterruptAt(interrupt)] if interrupt else []
        fit_resumable(model, stream, 4, 2, str(backup), 3, callbacks=extra, verbose=0)
        return [w.numpy() for w in model.weights]

    whole = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", interrupt=5)
    assert StepBackup.resume_step(str(tmp_path / "b")) == 3
    for a, b in zip(whole, run(tmp_path / "b")):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------- killed processes --


def rnode(*args):
    return subprocess.Popen([sys.executable, "-m", "keras_rnode.cli", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for(predicate, proc, timeout=240):
    start = time.monotonic()
    while not predicate():
        assert proc.poll() is None, "the process ended before it could be killed"
        assert time.monotonic() - start < timeout
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_training_process_resumes_to_the_same_weights(tmp_path):
    args = [*TINY, "--steps", "40", "--checkpoint-every", "4"]
    whole = tmp_path / "whole"
    assert invoke("train", *args, "--out", whole).exit_code == 0
    killed = tmp_path / "killed"
    proc = rnode("train", *args, "--out", killed)
    backup = str(killed / "checkpoint")
    wait_for(lambda: (StepBackup.resume_step(backup) or 0) >= 8, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = invoke("train", "--resume", "--out", killed)
    assert result.exit_code == 0, result.output
    assert json.loads((killed / "metrics.json").read_text())["resumed_from_step"] >= 8
    for a, b in zip(model_weights(whole), model_weights(killed)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sigint_in_the_final_evaluation_of_a_process(tmp_path):
    """The issue's `timeout -s INT 28 rnode train --steps 30 --n-test 200000`: Ctrl-C while
    a large held-out split is scored."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "keras_rnode.cli", "train",
                             *map(str, TINY), "--steps", "2", "--n-test", "400000", "--out",
                             str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for(lambda: (run / "model.keras").exists(), proc)
    time.sleep(2)  # into the evaluation
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr
    assert "interrupted; training is done (step 2)" in stderr and "Aborted" not in stderr
    result = invoke("train", "--resume", "--out", run, "--n-test", "64")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "metrics.json").read_text())["test"]["n"] == 64


@pytest.mark.slow  # TensorFlow 73 s, JAX 56 s on this 2-core machine under load
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_killed_two_device_run_resumes_to_the_same_weights(tmp_path, backend):
    """--devices 2 (TensorFlow's MirroredStrategy on two logical CPUs, JAX's DataParallel
    on two host devices), killed mid-epoch: the resumed run ends with the weights of an
    uninterrupted one. Each run is a fresh process: the CPU is split as it starts. (JAX
    compiles its steps: uncompiled, it retraces the solver's loops at every step.)"""
    env = dict(os.environ, KERAS_BACKEND=backend, CUDA_VISIBLE_DEVICES="")
    tiny = [a for a in TINY if a != "--no-jit"] + ["--jit", "on"] if backend == "jax" else TINY
    args = [*tiny, "--devices", "2", "--steps", "40", "--checkpoint-every", "4"]

    def rnode_run(*more):
        proc = subprocess.run([sys.executable, "-m", "keras_rnode.cli", *map(str, more)],
                              capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    rnode_run("train", *args, "--out", whole)
    proc = subprocess.Popen([sys.executable, "-m", "keras_rnode.cli", "train", *args, "--out",
                             str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    try:
        backup = str(killed / "checkpoint")
        wait_for(lambda: (StepBackup.resume_step(backup) or 0) >= 8, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    rnode_run("train", "--resume", "--out", killed)
    metrics = json.loads((killed / "metrics.json").read_text())
    assert 8 <= metrics["resumed_from_step"] < 40
    assert json.loads((killed / "config.json").read_text())["devices"] == 2
    for a, b in zip(model_weights(whole), model_weights(killed)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_killed_export_never_leaves_a_half_written_model(tmp_path):
    run = tmp_path / "run"
    assert invoke("train", *TINY, "--trace", "exact", "--steps", "2", "--out", run).exit_code == 0
    out = tmp_path / "exported"
    assert invoke("export", run, "--out", out).exit_code == 0
    before = sorted(os.listdir(out))
    proc = rnode("export", run, "--out", out, "--overwrite")
    # Kill it while it writes its staging copy.
    wait_for(lambda: any(n.startswith(".exported.partial-") for n in os.listdir(tmp_path)),
             proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sorted(os.listdir(out)) == before
    import tensorflow as tf

    x = np.zeros((3, 2), np.float32)
    reloaded = tf.saved_model.load(str(out))  # a good, complete export still stands
    np.testing.assert_allclose(reloaded.log_prob(x).numpy(), load_model(run).log_prob(x),
                               rtol=1e-5)


# ------------------------------------------------------------------- fuzz --

OPTIONS = ["--dataset", "--hidden", "--blocks", "--steps", "--epochs", "--batch-size", "--lr",
           "--method", "--step-size", "--rtol", "--max-steps", "--trace", "--noise",
           "--checkpoint-every", "--on-nan", "--on-max-steps", "--nfe-limit", "--on-nfe-limit",
           "--n-train", "--seed", "--out", "--eval-method", "--kinetic", "--bogus"]
VALUES = st.one_of(st.sampled_from(["0", "-1", "1e-3", "nan", "inf", "abc", "", "64,x",
                                    "skip", "stop", "warn", "rk4", "exact", "missing.npy",
                                    "8gaussians", "3.5", "99999999999999999999"]),
                   st.text(max_size=6))
ARGS = st.lists(st.one_of(st.sampled_from(OPTIONS + ["--resume", "--overwrite", "--jit"]),
                          VALUES), max_size=8)


@hypothesis.settings(max_examples=25, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(command=st.sampled_from(["train", "evaluate", "sample", "export"]),
                  args=ARGS)
def test_fuzzed_command_lines_end_without_a_traceback(command, args, tmp_path_factory):
    where = tmp_path_factory.mktemp("fuzz")
    if command == "train":
        # Fail fast after every check that needs no data: the data file is missing.
        tail = ["--out", where / "run", "--dataset", where / "missing.npy"]
    else:
        tail = [where / "no-run", "--out", where / "o.npy"] if command != "evaluate" else [
            where / "no-run"]
    result = CliRunner().invoke(main, [command, *args, *map(str, tail)])
    assert result.exit_code in (1, 2), result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
