"""The `rnode` command line and scripts/evaluate_bpd.py, end to end on tiny runs."""

import importlib.util
import json
import os
import pathlib

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from keras_rnode.cli import main

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
    """`rnode train` on 8gaussians with the default XLA step; the run dir and its output."""
    run = tmp_path_factory.mktemp("runs") / "8g"
    result = invoke("train", *TOY, "--out", run)
    assert result.exit_code == 0, result.output
    return run, result.output


# --------------------------------------------------------------------- help --


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
    assert config["trace"] == "exact" and config["jit"] is True and config["steps"] == 6
    assert config["eval_method"] == "dopri5" and config["kinetic"] == 0.01
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


def test_train_refuses_to_overwrite_a_run(toy_run):
    run, _ = toy_run
    before = (run / "model.keras").stat().st_mtime_ns
    assert_clean_error(invoke("train", *TOY, "--out", run), "--overwrite")
    assert (run / "model.keras").stat().st_mtime_ns == before


def test_train_digits_with_a_tiny_conv_net(tmp_path):
    run = tmp_path / "digits"
    result = invoke("train", "--dataset", "digits", "--hidden", "8", "--steps", "2",
                    "--batch-size", "32", "--n-test", "32", "--method", "euler",
                    "--step-size", "0.5", "--eval-method", "rk4", "--eval-step-size", "0.5",
                    "--no-jit", "--quiet", "--out", run)
    assert result.exit_code == 0, result.output
    assert (run / "samples.png").is_file() and not (run / "density.png").exists()
    config = json.loads((run / "config.json").read_text())
    assert config["trace"] == "hutchinson" and config["levels"] == 17
    metrics = json.loads((run / "metrics.json").read_text())
    assert "bpd" in metrics["train"] and "nll" not in metrics["train"]
    assert 0 < metrics["test"]["bpd"] < 20 and 0 < metrics["test"]["bpd_midpoint"] < 20
    assert "bits/dim (uniform dequantization)" in result.output
    assert "clean (midpoint)" in result.output

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


def test_sample_writes_npy_and_png(toy_run, tmp_path):
    run, _ = toy_run
    result = invoke("sample", run, "-n", 10, "--out", tmp_path / "s.npy", "--seed", 1)
    assert result.exit_code == 0, result.output
    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == (10, 2) and np.all(np.isfinite(samples))
    assert invoke("sample", run, "-n", 50, "--out", tmp_path / "s.png").exit_code == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    assert_clean_error(invoke("sample", run, "--out", tmp_path / "s.txt"), ".npy or .png")


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
