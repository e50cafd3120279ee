"""The `rnode` command line and scripts/evaluate_bpd.py, end to end on tiny runs."""

import dataclasses
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import click
import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

import keras_rnode as kr

from keras_rnode import runs
from keras_rnode.cli import main
from keras_rnode.trajectories import length_ratio, trajectories

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A few cheap steps: tiny net, Euler training (the cheapest solver to trace and
# compile), loose evaluation tolerances.
TOY = ["--dataset", "8gaussians", "--hidden", "16,16", "--steps", "6", "--batch-size", "64",
       "--n-train", "256", "--n-test", "128", "--method", "euler", "--step-size", "0.25",
       "--eval-rtol", "1e-3", "--eval-atol", "1e-3", "--eval-batch-size", "64"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def last_json(output):
    return json.loads(output.strip().splitlines()[-1])


def assert_clean_error(result, *words):
    """Exit code != 0, no traceback, and one `Error:` line holding `words`."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for word in words:
        assert word in errors[0], result.output


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """`rnode train` on 8gaussians with the default (--jit auto: XLA) step; the run dir and
    its output."""
    run = tmp_path_factory.mktemp("runs") / "8g"
    result = invoke("train", *TOY, "--out", run)
    assert result.exit_code == 0, result.output
    return run, result.output


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A two-step Hutchinson-trained digits run with a tiny conv net; the run dir and output."""
    run = tmp_path_factory.mktemp("runs") / "digits"
    result = invoke("train", "--dataset", "digits", "--architecture", "single", "--hidden", "8",
                    "--steps", "2", "--batch-size", "32", "--n-test", "32", "--method", "euler",
                    "--step-size", "0.5", "--eval-method", "rk4", "--eval-step-size", "0.5",
                    "--no-jit", "--quiet", "--out", run)
    assert result.exit_code == 0, result.output
    return run, result.output


# --------------------------------------------------------------------- help --

# Run in a fresh interpreter: keras_rnode imported, the help of the group and of
# train printed; then which heavy modules were loaded.
HELP_SCRIPT = """
import sys
import keras_rnode as kr
from keras_rnode.cli import main
assert set(kr.__all__) <= set(dir(kr)), set(kr.__all__) - set(dir(kr))
for args in (["--help"], ["train", "--help"], ["evaluate", "--help"], ["sample", "--help"]):
    main(args, standalone_mode=False)
print("LOADED", sorted(m for m in ("keras", "tensorflow", "jax", "torch") if m in sys.modules))
"""
# Lines TensorFlow's C++ side and absl print (I0000 ..., E0000 ..., "WARNING: All log
# messages before absl::InitializeLog() ...").
NOISE = ("I0000", "W0000", "E0000", "absl::", "oneDNN", "cuda", "TF_ENABLE")


def fresh_python(*args):
    """Run python with `args` in a fresh process, TensorFlow's log level left to keras_rnode."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_help_loads_neither_keras_nor_tensorflow():
    proc = fresh_python("-c", HELP_SCRIPT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "LOADED []", proc.stdout[-500:]
    assert "rnode train" in proc.stdout and "--jit [auto|on|off]" in proc.stdout
    assert not [line for line in (proc.stdout + proc.stderr).splitlines()
                if any(word in line for word in NOISE)], proc.stderr


def test_a_command_that_loads_tensorflow_prints_only_its_own_lines(tmp_path):
    proc = fresh_python("-m", "keras_rnode.cli", "evaluate", str(tmp_path / "missing"))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"Error: {tmp_path / 'missing'} does not exist"], proc.stderr


def test_seeding_under_jax_loads_tensorflow_quietly():
    """keras.utils.set_random_seed imports TensorFlow under any backend where it is
    installed; `rnode train` loads it first, silenced."""
    script = ("from keras_rnode.quiet_import import load_keras; load_keras(seeds=True); "
              "import keras; keras.utils.set_random_seed(0); print(keras.config.backend())")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**env, "KERAS_BACKEND": "jax"})
    assert proc.returncode == 0 and proc.stdout.strip() == "jax", proc.stderr
    assert not [line for line in proc.stderr.splitlines()
                if any(word in line for word in NOISE)], proc.stderr


def test_help_teaches_with_examples():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("train", "evaluate", "sample", "export", "Examples"):
        assert command in result.output
    for command in ("train", "evaluate", "sample", "export"):
        out = invoke(command, "--help").output
        assert "Examples" in out and f"rnode {command}" in out, out


# -------------------------------------------------------------------- train --


def test_train_writes_the_run_directory(toy_run):
    run, output = toy_run
    for name in ("model.keras", "config.json", "metrics.json", "history.json", "density.png"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] == "8gaussians" and config["hidden"] == [16, 16]
    # --jit auto resolved: XLA for flat data.
    assert config["trace"] == "exact" and config["jit"] is True and config["steps"] == 6
    assert config["eval_method"] == "dopri5"
    assert config["regularizers"] == {"kinetic": 0.01, "jacobian": 0.01}
    metrics = json.loads((run / "metrics.json").read_text())
    for name in ("loss", "nll", "kinetic", "jacobian", "nfe"):
        assert np.isfinite(metrics["train"][name]), name
    # The direct gradient (rnode train's default) solves nothing backwards.
    assert "backward_nfe" not in metrics["train"]
    assert metrics["test"]["n"] == 128 and np.isfinite(metrics["test"]["nll"])
    assert metrics["test"]["nfe"] > 0 and metrics["test"]["status"] == "success"
    assert metrics["wall_seconds"] >= metrics["train_seconds"] > 0
    history = json.loads((run / "history.json").read_text())
    assert len(history["loss"]) == 1
    assert "8gaussians test (128 points): nll" in output and "NFE" in output
    # Off a terminal progress is a plain line (keras_rnode.progress), with the forward NFE
    # and no backward NFE where nothing solves back.
    assert "step 6/6" in output and " nfe " in output and "backward_nfe" not in output
    assert "\x1b[" not in output


def test_train_refuses_to_overwrite_a_run(toy_run):
    run, _ = toy_run
    before = (run / "model.keras").stat().st_mtime_ns
    assert_clean_error(invoke("train", *TOY, "--out", run), "--overwrite")
    assert (run / "model.keras").stat().st_mtime_ns == before


def test_train_digits_with_a_tiny_conv_net(digits_run, tmp_path):
    run, output = digits_run
    assert (run / "samples.png").is_file() and not (run / "density.png").exists()
    config = json.loads((run / "config.json").read_text())
    assert config["trace"] == "hutchinson" and config["levels"] == 17 and config["jit"] is False
    metrics = json.loads((run / "metrics.json").read_text())
    assert "bpd" in metrics["train"] and "nll" not in metrics["train"]
    assert 0 < metrics["test"]["bpd"] < 20 and 0 < metrics["test"]["bpd_midpoint"] < 20
    assert "bits/dim (uniform dequantization)" in output
    assert "clean (midpoint)" in output

    # scripts/evaluate_bpd.py runs the same evaluation on the saved model.
    spec = importlib.util.spec_from_file_location("evaluate_bpd",
                                                  ROOT / "scripts" / "evaluate_bpd.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = CliRunner().invoke(script.main, [str(run), "--dataset", "digits", "--n", "16",
                                           "--json"])
    assert out.exit_code == 0, out.output
    assert len(out.output.strip().splitlines()) == 1
    report = last_json(out.output)
    assert report["n"] == 16 and report["dataset"] == "digits" and report["nfe"] == 8
    assert 0 < report["bpd"] < 20
    wrong = CliRunner().invoke(script.main, [str(tmp_path), "--dataset", "digits"])
    assert_clean_error(wrong, "model.keras")


@pytest.fixture
def parsed(monkeypatch):
    """args -> the TrainSettings `rnode train ARGS` would train with (nothing is trained)."""
    seen = []

    def train(settings, note=None):
        seen.append(settings)
        raise runs.RunFailed("not trained")

    monkeypatch.setattr(runs, "train", train)

    def parse(args):
        seen.clear()
        result = invoke("train", *args)
        if not seen:
            raise AssertionError(result.output)
        return seen[0]

    return parse


def test_the_command_line_defaults_are_train_settings(parsed):
    """`rnode train` with no options trains `kr.TrainSettings()`: the options show its
    defaults, which are the fast path (the direct gradient, XLA where it pays)."""
    defaults = kr.TrainSettings()
    assert parsed([]) == defaults
    assert defaults.regularizers == {"kinetic": 0.01, "jacobian": 0.01}
    assert defaults.solver == kr.SolverSettings(gradient="direct")
    # Evaluation as training, but each sample held to the tolerances.
    assert defaults.eval_solver == defaults.solver.replace(error_norm="per_sample")
    assert (defaults.dataset, defaults.batch_size, defaults.lr) == ("8gaussians", 512, 1e-3)
    options = " ".join(invoke("train", "--help").output.split()).split("Options:")[1]
    for option, value in (("--batch-size", 512), ("--n-train", defaults.n_train),
                          ("--kinetic", 0.01), ("--directional", 0.0), ("--gradient", "direct"),
                          ("--error-norm", "rms"), ("--eval-error-norm", "per_sample")):
        assert f"[default: {value}" in options.split(option + " ", 1)[1].split(" --", 1)[0]
    # One toy training size: the data set's default draw is the command's.
    x, _ = kr.datasets.load_data("8gaussians", "train")
    assert len(x) == defaults.n_train == 100000
    # Settings travel as a typed value, checked when made, in the command line's words.
    quick = dataclasses.replace(defaults, steps=2, hidden=[8, 8])
    assert quick.hidden == (8, 8) and quick.steps == 2 and quick.epochs is None
    with pytest.raises(ValueError, match="--lr"):
        dataclasses.replace(defaults, lr=float("nan"))
    assert kr.TrainSettings.from_options(quick.to_options()) == quick


def test_regularizer_flags_fold_into_one_dict(parsed):
    from keras_rnode import regularizers

    options = invoke("train", "--help").output
    assert all(f"--{name.replace('_', '-')} FLOAT" in options for name in regularizers.BUILTINS)
    assert parsed(["--kinetic", "0.05", "--total-derivative", "0.1"]).regularizers == {
        "kinetic": 0.05, "jacobian": 0.01, "total_derivative": 0.1}
    # A weight of 0 is no penalty: the unregularized flow has none.
    assert parsed(["--kinetic", "0", "--jacobian", "0"]).regularizers == {}
    assert parsed(["--directional", "0"]) == kr.TrainSettings()
    assert_clean_error(invoke("train", "--jacobian", "-1"), "--jacobian", ">= 0")


def test_the_new_penalties_train(tmp_path):
    run = tmp_path / "r"
    result = invoke("train", *TOY, "--quiet", "--directional", "0.01", "--total-derivative", "0.01",
                    "--out", run)
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["directional"] > 0 and metrics["train"]["total_derivative"] > 0


def test_jit_spellings_and_the_auto_rule(parsed):
    assert parsed([]).jit == "auto"
    spelled = (["--jit"], ["--jit", "on"], ["--jit", "--quiet"], ["--no-jit"], ["--jit", "off"],
               ["--jit", "auto"])
    assert [parsed(args).jit for args in spelled] == [True, True, True, False, False, "auto"]
    assert_clean_error(invoke("train", "--jit", "--no-jit"), "--no-jit")
    with pytest.raises(ValueError, match="jit"):
        dataclasses.replace(kr.TrainSettings(), jit="on")
    # XLA for dense dynamics; for conv dynamics only on a GPU (this machine's answer either way).
    gpu = bool(keras.distribution.list_devices("gpu"))
    assert kr.TrainSettings().resolved((2,)).jit is True
    conv = kr.TrainSettings(architecture="single").resolved((8, 8, 1))
    assert conv.jit is gpu and conv.trace == "hutchinson"
    assert kr.TrainSettings(jit=False).resolved((2,)).jit is False


def test_the_architecture_auto_rule():
    """Dense dynamics for flat data and small images (with wider defaults), multiscale beyond."""
    auto = kr.TrainSettings()
    assert auto.architecture == "auto"
    flat, digits, mnist = (auto.resolved(shape) for shape in ((2,), (8, 8, 1), (28, 28, 1)))
    assert (flat.architecture, flat.hidden) == ("single", (64, 64, 64))
    assert (digits.architecture, digits.hidden, digits.jit) == ("dense", (256, 256), True)
    assert (mnist.architecture, mnist.hidden) == ("multiscale", (64, 64, 64))
    assert kr.TrainSettings(hidden=(32,)).resolved((8, 8, 1)).hidden == (32,)
    with pytest.raises(runs.OptionConflict, match="--layer-type"):
        kr.TrainSettings(architecture="dense", layer_type="concat").resolved((8, 8, 1))


# ----------------------------------------------------- evaluate, sample, export --


def test_evaluate_reproduces_the_held_out_nll(toy_run):
    run, _ = toy_run
    result = invoke("evaluate", run)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[-2].startswith("8gaussians test (128 points): nll")
    report = last_json(result.output)
    assert report["dataset"] == "8gaussians" and report["split"] == "test"
    # The same test draw (seed + 1), exact trace and eval solver as at training.
    metrics = json.loads((run / "metrics.json").read_text())
    assert report["nll"] == pytest.approx(metrics["test"]["nll"], rel=1e-5)
    assert report["nfe"] == metrics["test"]["nfe"]
    only = invoke("evaluate", run, "--json")
    assert len(only.output.strip().splitlines()) == 1
    assert last_json(only.output)["nll"] == pytest.approx(report["nll"], rel=1e-5)


def test_evaluate_chooses_the_trace_probes_and_solver(digits_run):
    run, _ = digits_run
    trained = last_json(invoke("evaluate", run, "--json").output)
    assert trained["trace"] == "hutchinson" and trained["solver"] == "rk4 step=0.5"
    assert "bpd_se" not in trained
    # A Hutchinson-trained run scored with the exact trace.
    exact = invoke("evaluate", run, "--trace", "exact")
    assert exact.exit_code == 0, exact.output
    report = last_json(exact.output)
    assert report["trace"] == "exact" and "bpd_se" not in report
    assert 0 < report["bpd"] < 20 and report["bpd"] != trained["bpd"]
    # K probes: the standard error beside bits/dim, in the line and the JSON.
    probes = invoke("evaluate", run, "--probes", "4")
    assert probes.exit_code == 0, probes.output
    report = last_json(probes.output)
    assert report["trace"] == "hutchinson x4" and 0 < report["bpd_se"] < 1
    assert abs(report["bpd"] - trained["bpd"]) < 10 * report["bpd_se"] + 0.05
    assert "bits/dim (uniform dequantization) +- " in probes.output
    # Another evaluation solver: a fixed-step one, and the run's rk4 replaced by dopri5.
    rk4 = last_json(invoke("evaluate", run, "--method", "rk4", "--step-size", "0.25",
                           "--json").output)
    assert rk4["solver"] == "rk4 step=0.25" and rk4["nfe"] == 2 * trained["nfe"]
    dopri5 = last_json(invoke("evaluate", run, "--method", "dopri5", "--rtol", "1e-3",
                              "--atol", "1e-4", "--json").output)
    assert dopri5["solver"] == "dopri5 rtol=0.001 atol=0.0001 error_norm=per_sample"
    assert dopri5["bpd"] == pytest.approx(trained["bpd"], abs=0.01)
    assert_clean_error(invoke("evaluate", run, "--method", "euler"), "--step-size")
    assert_clean_error(invoke("evaluate", run, "--method", "dopri5", "--step-size", "0.1"),
                       "--step-size")


def test_evaluate_probes_of_a_2d_run_need_the_hutchinson_trace(toy_run):
    run, _ = toy_run
    exact = last_json(invoke("evaluate", run, "--json").output)
    forced = invoke("evaluate", run, "--trace", "hutchinson", "--probes", "4")
    assert forced.exit_code == 0, forced.output
    report = last_json(forced.output)
    assert report["trace"] == "hutchinson x4" and report["nll_se"] > 0
    assert "nats +- " in forced.output
    assert report["nll"] == pytest.approx(exact["nll"], abs=10 * report["nll_se"] + 1e-3)
    assert_clean_error(invoke("evaluate", run, "--probes", "4"), "--trace hutchinson")


def test_sample_writes_npy_and_png(toy_run, tmp_path):
    run, _ = toy_run
    result = invoke("sample", run, "-n", 10, "--out", tmp_path / "s.npy", "--seed", 1)
    assert result.exit_code == 0, result.output
    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == (10, 2) and np.all(np.isfinite(samples))
    assert invoke("sample", run, "-n", 50, "--out", tmp_path / "s.png").exit_code == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    assert_clean_error(invoke("sample", run, "--out", tmp_path / "s.txt"), ".npy or .png")


def test_sample_trajectories_writes_the_paths(toy_run, tmp_path):
    run, _ = toy_run
    result = invoke("sample", run, "-n", 30, "--trajectories", "--steps", 4, "--out",
                    tmp_path / "paths.npy")
    assert result.exit_code == 0, result.output
    paths = np.load(tmp_path / "paths.npy")
    assert paths.shape == (5, 30, 2) and np.all(np.isfinite(paths))
    x, _ = runs.evaluation_data(runs.load_config(run), n_test=30)
    np.testing.assert_array_equal(paths[0], x)
    assert "mean path length / mean displacement" in result.output
    png = invoke("sample", run, "-n", 30, "--trajectories", "--out", tmp_path / "paths.png")
    assert png.exit_code == 0, png.output
    assert (tmp_path / "paths.png").read_bytes()[:4] == b"\x89PNG"


def test_trajectories_run_from_the_data_to_the_models_z():
    x = kr.datasets.toy("8gaussians", 64, seed=0)
    cnf = kr.layers.CNF(kr.layers.ConcatSquashMLP(hidden=(16, 16)), trace="exact",
                        eval_rtol=1e-6, eval_atol=1e-6, seed=0)
    model = kr.RNODE([cnf])
    model.log_prob(x[:2])  # builds it
    rng = np.random.default_rng(0)
    for w in model.weights:  # dynamics that move the points (the last layer starts at 0)
        w.assign(rng.normal(0, 0.5, w.shape).astype(np.float32))
    paths = trajectories(model, x, steps=5)
    assert paths.shape == (6, 64, 2)
    np.testing.assert_array_equal(paths[0], x)
    z = np.asarray(keras.ops.convert_to_numpy(cnf(x)[0]))
    assert np.mean(np.linalg.norm(z - x, axis=1)) > 0.1  # the flow moves them
    np.testing.assert_allclose(paths[-1], z, atol=1e-4)
    assert length_ratio(paths) >= 1.0
    with pytest.raises(ValueError, match="steps"):
        trajectories(model, x, steps=0)


def test_length_ratio_is_one_for_straight_paths():
    start, end = np.zeros((3, 2)), np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    straight = np.stack([start + (end - start) * s for s in np.linspace(0, 1, 7)])
    assert length_ratio(straight) == pytest.approx(1.0)
    # One point out along a side of the unit square and back across the diagonal:
    bent = np.array([[[0.0, 0.0]], [[1.0, 0.0]], [[1.0, 1.0]]])
    assert length_ratio(bent) == pytest.approx(2 / np.sqrt(2))


def test_export_writes_a_saved_model_and_protects_it(toy_run, tmp_path):
    run, _ = toy_run
    out = tmp_path / "exported"
    result = invoke("export", run, "--out", out)
    assert result.exit_code == 0, result.output
    reloaded = tf.saved_model.load(str(out))
    x = np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32)
    assert np.all(np.isfinite(reloaded.log_prob(tf.constant(x)).numpy()))
    assert reloaded.sample(tf.constant(4)).shape == (4, 2)
    assert_clean_error(invoke("export", run, "--out", out), "--overwrite")
    assert invoke("export", run, "--out", out, "--overwrite").exit_code == 0
    assert sorted(os.listdir(tmp_path)) == ["exported"]
    assert "(endpoints: log_prob, sample)" in result.output


def test_export_says_which_endpoints_it_wrote(toy_run, tmp_path, monkeypatch):
    """The backend decides (JAX's export has log_prob alone); the line says what was written."""
    from keras_rnode import backend

    monkeypatch.setattr(backend, "saved_model_endpoints", lambda: ("log_prob",))
    result = invoke("export", toy_run[0], "--out", tmp_path / "e")
    assert result.exit_code == 0, result.output
    assert "(endpoints: log_prob)" in result.output
    reloaded = tf.saved_model.load(str(tmp_path / "e"))
    assert hasattr(reloaded, "log_prob") and not hasattr(reloaded, "sample")


@pytest.mark.slow  # two fresh JAX processes, a jax2tf export
def test_a_jax_export_says_it_wrote_log_prob_alone(tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "jax"}

    def rnode(*args):
        proc = subprocess.run([sys.executable, "-m", "keras_rnode.cli", *map(str, args)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    rnode("train", *TOY, "--quiet", "--out", tmp_path / "run")
    out = rnode("export", tmp_path / "run", "--out", tmp_path / "e")
    assert "(endpoints: log_prob)" in out
    reloaded = tf.saved_model.load(str(tmp_path / "e"))
    assert hasattr(reloaded, "log_prob") and not hasattr(reloaded, "sample")


def test_exported_folders_take_the_umask(toy_run, tmp_path):
    """Like every other file: not tempfile.mkdtemp's 0700 (a staging folder renamed into place)."""
    previous = os.umask(0o027)
    try:
        result = invoke("export", toy_run[0], "--out", tmp_path / "e")
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "e").stat().st_mode & 0o777 == 0o750
    assert ((tmp_path / "e" / "saved_model.pb").stat().st_mode & 0o777) == 0o640


# ------------------------------------------------------------------- errors --


def test_unknown_dataset(tmp_path):
    assert_clean_error(invoke("train", "--dataset", "9gaussians", "--out", tmp_path / "r"),
                       "9gaussians", "pinwheel")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("hidden", ["64,x", "0", "", "64,,64", "-3"])
def test_bad_hidden(tmp_path, hidden):
    assert_clean_error(invoke("train", "--hidden", hidden, "--out", tmp_path / "r"),
                       "--hidden")


def test_run_dir_without_a_model(tmp_path):
    for command in (["evaluate", tmp_path], ["sample", tmp_path, "--out", tmp_path / "s.npy"],
                    ["export", tmp_path, "--out", tmp_path / "e"]):
        assert_clean_error(invoke(*command), "model.keras")
    assert_clean_error(invoke("evaluate", tmp_path / "missing"), "does not exist")


def test_nan_data(tmp_path, toy_run):
    x = np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32)
    x[7, 0] = np.nan
    np.save(tmp_path / "nan.npy", x)
    assert_clean_error(invoke("train", "--dataset", tmp_path / "nan.npy", "--out",
                              tmp_path / "r"), "NaN", "row 7")
    assert not (tmp_path / "r").exists()
    run, _ = toy_run
    assert_clean_error(invoke("evaluate", run, "--dataset", tmp_path / "nan.npy"), "NaN")


def test_fixed_step_method_needs_a_step_size(tmp_path):
    assert_clean_error(invoke("train", "--method", "rk4", "--out", tmp_path / "r"),
                       "--step-size")


def float_options(command):
    return [p for p in main.commands[command].params
            if isinstance(p.type, click.types.FloatParamType)]


def test_every_float_option_of_train_refuses_nan_and_inf(tmp_path):
    """Before anything is written or keras loads: a NaN learning rate once trained to NaN
    weights and blamed --max-steps."""
    names = {p.opts[0] for p in float_options("train")}
    assert {"--lr", "--rtol", "--eval-atol", "--step-size", "--kinetic", "--logit-alpha"} <= names
    for name in sorted(names):
        # A step size is a fixed-step method's.
        method = [name.replace("step-size", "method"), "rk4"] if "step-size" in name else []
        for value in ("nan", "inf", "-inf"):
            result = invoke("train", *method, name, value, "--out", tmp_path / "r")
            assert_clean_error(result, name, value)
    assert not (tmp_path / "r").exists()


def test_every_float_option_of_evaluate_refuses_nan_and_inf(toy_run):
    names = sorted(p.opts[0] for p in float_options("evaluate"))
    assert names == ["--atol", "--rtol", "--step-size"]
    for name in names:
        method = ["--method", "rk4"] if name == "--step-size" else []
        for value in ("nan", "inf"):
            assert_clean_error(invoke("evaluate", toy_run[0], *method, name, value), name, value)


def test_a_batch_larger_than_the_data_is_refused_before_anything_is_written(tmp_path):
    """`--n-train 100` at the default batch of 512 ended in a ZeroDivisionError traceback, and
    a refused run left checkpoint/options.json, so the corrected command was refused as an
    interrupted run."""
    run = tmp_path / "r"
    for schedule in ([], ["--epochs", "1"], ["--steps", "3"]):
        result = invoke("train", "--n-train", 100, *schedule, "--out", run)
        assert_clean_error(result, "--batch-size 512", "100 training points", "--n-train")
        assert not run.exists()
    fixed = invoke("train", *TOY, "--n-train", 100, "--batch-size", 50, "--steps", 2,
                   "--quiet", "--out", run)
    assert fixed.exit_code == 0, fixed.output


def test_ctrl_c_before_a_run_writes_anything_or_in_another_command(tmp_path, monkeypatch,
                                                                  toy_run):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "load_data", interrupt)
    result = invoke("train", *TOY, "--out", tmp_path / "r")
    assert result.exit_code == 130 and "interrupted; nothing was written" in result.output
    assert not (tmp_path / "r").exists()
    monkeypatch.setattr(runs, "held_out_quality", interrupt)
    result = invoke("evaluate", toy_run[0])
    assert result.exit_code == 130 and "interrupted; nothing was written" in result.output
    assert "Aborted" not in result.output
