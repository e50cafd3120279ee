"""`rnode train --objective flow-matching`, its fine-tuning by likelihood, and the kinetic
energy `rnode evaluate` reports, end to end on tiny runs.

- The flags reach TrainSettings; --coupling and --sigma without flow
  matching, a fine-tune without its length, and flow matching through the
  multiscale model are one-line usage errors.
- A flow-matching run writes its run directory: the objective in
  config.json, flow_matching (and no solver figure) in history.json and in
  the progress line; --jit with the OT coupling trains in graph mode on
  TensorFlow, with a note.
- `--resume --objective likelihood --steps N` fine-tunes a finished run N
  steps from its weights with a fresh Adam; both phases are kept. An
  interrupted fine-tune (before and after its first checkpoint) and an
  interrupted flow-matching run fine-tuned at once end with the weights of
  the uninterrupted fine-tune.
- `rnode evaluate` prints the kinetic energy for both objectives, equal to
  `model.penalties` over the test split.
"""

import dataclasses
import json
import shutil
import warnings

import keras
import numpy as np
import pytest

import keras_rnode as kr
from keras_rnode import runs
from keras_rnode.runs import load_model
from tests.test_cli import parsed  # noqa: F401 - a fixture
from tests.test_resume import invoke
from tests.test_resume import train_interrupted as interrupted

# 256 points in batches of 64; Euler training steps, a loose evaluation: these tests are
# about the run directory and its phases, not about solvers.
TINY = ["--dataset", "8gaussians", "--hidden", "8", "--batch-size", "64", "--n-train", "256",
        "--n-test", "64", "--method", "euler", "--step-size", "0.5", "--eval-method", "euler",
        "--eval-step-size", "0.5", "--eval-batch-size", "64", "--trace", "hutchinson",
        "--no-jit", "--quiet"]
FM = [*TINY, "--objective", "flow-matching", "--coupling", "ot", "--sigma", "0.05",
      "--steps", "6", "--checkpoint-every", "2"]
FINE_TUNE = ["--objective", "likelihood", "--steps", "4", "--checkpoint-every", "2"]


def read(run, name):
    return json.loads((run / name).read_text())


def weights(run):
    return [w.numpy() for w in load_model(run).weights]


def assert_usage_error(result, *words):
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in error[0], result.output


@pytest.fixture(scope="module")
def fm_run(tmp_path_factory):
    """A finished 6-step OT flow-matching run; (run dir, output)."""
    run = tmp_path_factory.mktemp("runs") / "fm"
    result = invoke("train", *FM, "--out", run)
    assert result.exit_code == 0, result.output
    return run, result.output


@pytest.fixture(scope="module")
def fine_tuned(fm_run, tmp_path_factory):
    """The flow-matching run fine-tuned 4 steps by likelihood, uninterrupted; (run dir,
    output)."""
    run = tmp_path_factory.mktemp("runs") / "tuned"
    shutil.copytree(fm_run[0], run)
    result = invoke("train", "--resume", "--out", run, *FINE_TUNE)
    assert result.exit_code == 0, result.output
    return run, result.output


# -------------------------------------------------------------------- flags --


def test_the_objective_flags_reach_the_settings(parsed):
    default = parsed([])
    assert (default.objective, default.coupling, default.sigma) == ("likelihood",
                                                                    "independent", 0.0)
    assert default.training_objective == kr.objectives.Likelihood()
    fm = parsed(["--objective", "flow-matching", "--coupling", "ot", "--sigma", "0.1"])
    assert (fm.objective, fm.coupling, fm.sigma) == ("flow_matching", "ot", 0.1)
    assert fm.training_objective == kr.objectives.FlowMatching(coupling="ot", sigma=0.1)
    assert kr.TrainSettings.from_options(fm.to_options()) == fm
    # Runs written before the objective was an option read as likelihood runs, also those
    # whose config.json held the likelihood's metric under "objective".
    old = {k: v for k, v in kr.TrainSettings().to_options().items()
           if k not in ("objective", "coupling", "sigma")}
    assert kr.TrainSettings.from_options(old) == kr.TrainSettings()
    assert kr.TrainSettings.from_options({**old, "objective": "bpd"}) == kr.TrainSettings()


@pytest.mark.parametrize("args, words", [
    (["--coupling", "ot"], ["--coupling ot", "--objective flow-matching"]),
    (["--sigma", "0.1"], ["--sigma 0.1", "--objective flow-matching"]),
    (["--objective", "likelihood", "--coupling", "independent"], ["--coupling independent"]),
    (["--coupling", "ot", "--sigma", "0.1"], ["--coupling ot and --sigma 0.1"]),
])
def test_flow_matching_options_without_flow_matching_are_refused(args, words, tmp_path):
    assert_usage_error(invoke("train", *args, "--out", tmp_path / "r"), *words)
    assert not (tmp_path / "r").exists()


def test_bad_flow_matching_values_are_refused(tmp_path):
    for args, words in ((["--sigma", "-1"], ["--sigma", ">= 0"]),
                        (["--coupling", "sinkhorn"], ["--coupling", "sinkhorn"]),
                        (["--objective", "score"], ["--objective", "score"])):
        result = invoke("train", "--objective", "flow-matching", *args, "--out", tmp_path / "r")
        assert result.exit_code in (1, 2) and "Traceback" not in result.output, result.output
        assert all(word in result.output for word in words), result.output
    with pytest.raises(runs.OptionConflict, match="--architecture single or dense"):
        kr.TrainSettings(objective="flow_matching").resolved((28, 28, 1))


def test_jit_auto_is_graph_mode_for_the_ot_coupling_on_tensorflow():
    """The OT assignment is a tf.numpy_function, which XLA cannot compile; the independent
    coupling's step is XLA's as any flat-data step."""
    ot = kr.TrainSettings(objective="flow_matching", coupling="ot")
    assert ot.host_assignment and ot.resolved((2,)).jit is False
    assert kr.TrainSettings(objective="flow_matching").resolved((2,)).jit is True
    # Asked for, it stays: `train` turns it off with a note (the fm_run fixture).
    assert dataclasses.replace(ot, jit=True).resolved((2,)).jit is True


# ------------------------------------------------------ a flow-matching run --


def test_a_flow_matching_run_writes_its_run_directory(fm_run):
    run, output = fm_run
    config = read(run, "config.json")
    assert (config["objective"], config["coupling"], config["sigma"]) == ("flow_matching",
                                                                          "ot", 0.05)
    assert config["jit"] is False and config["metric"] == "nll"
    assert config["phases"] == [{"objective": {"name": "flow_matching", "coupling": "ot",
                                               "sigma": 0.05}, "steps": 6}]
    history = read(run, "history.json")
    assert set(history) == {"loss", "flow_matching", "skipped_steps"}
    assert np.isfinite(history["flow_matching"][0]) and history["skipped_steps"] == [0]
    metrics = read(run, "metrics.json")
    assert metrics["train"]["flow_matching"] == history["flow_matching"][-1]
    test = metrics["test"]
    assert np.isfinite(test["nll"]) and test["nfe"] > 0 and test["kinetic"] > 0
    assert "phases" not in metrics and "phases" not in history
    assert "kinetic energy" in output


def test_the_progress_line_shows_the_flow_matching_loss(tmp_path):
    """Off a terminal progress is a plain line: flow matching's loss, no solver figure.
    The solver watches stay quiet (nothing is solved), however strict. XLA asked for with
    the OT coupling on TensorFlow: graph mode, with a note (not the model's warning)."""
    run = tmp_path / "fm"
    args = [a for a in FM if a not in ("--quiet", "--no-jit")]
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        result = invoke("train", *args, "--jit", "on", "--out", run, "--on-max-steps", "skip",
                        "--nfe-limit", "1", "--on-nfe-limit", "stop")
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("step 6/6"))
    assert " flow_matching " in line and " nfe " not in line and " nll " not in line
    assert "stopped" not in read(run, "metrics.json")
    assert "note: --coupling ot solves its assignment on the host" in result.output
    said = [str(w.message) for w in warned]
    assert not [w for w in said if "coupling='ot'" in w or "NFE" in w], said
    config = read(run, "config.json")
    assert config["jit"] is False and config["given"]["jit"] is True  # a resume decides again


def test_the_likelihood_phase_is_watched(fm_run, tmp_path):
    run = tmp_path / "watched"
    shutil.copytree(fm_run[0], run)
    # Euler at step 0.5: 2 evaluations a step, past the limit at the first.
    result = invoke("train", "--resume", "--out", run, "--objective", "likelihood", "--steps",
                    "2", "--nfe-limit", "1", "--on-nfe-limit", "stop")
    assert result.exit_code == 1 and "past the limit of 1" in result.output, result.output
    assert "--resume" in result.output


# ---------------------------------------------------------------- fine-tune --


def test_fine_tuning_starts_from_the_weights_with_a_fresh_adam(fm_run, tmp_path):
    """A fresh Adam's first step moves every weight by lr * g / (|g| + 3e-6): by lr (1e-3)
    where the gradient is not tiny. From other weights, or with flow matching's moments,
    the change from the flow-matching weights would be anything else."""
    run = tmp_path / "one-step"
    shutil.copytree(fm_run[0], run)
    result = invoke("train", "--resume", "--out", run, "--objective", "likelihood", "--steps",
                    "1")
    assert result.exit_code == 0, result.output
    start, tuned = (load_model(r).trainable_weights for r in (fm_run[0], run))
    moved = np.abs(np.concatenate([(a.numpy() - b.numpy()).ravel()
                                   for a, b in zip(start, tuned)]))
    assert moved.max() <= 1e-3 * (1 + 1e-5)
    assert np.median(moved) == pytest.approx(1e-3, rel=1e-2)
    optimizer = keras.saving.load_model(run / "model.keras").optimizer
    assert int(optimizer.iterations.numpy()) == 1  # not 6 + 1


def test_fine_tuning_keeps_both_phases(fm_run, fine_tuned):
    run, output = fine_tuned
    config = read(run, "config.json")
    assert (config["objective"], config["coupling"], config["steps"]) == ("likelihood",
                                                                          "independent", 4)
    assert config["regularizers"] == {"kinetic": 0.01, "jacobian": 0.01}
    assert [p["objective"]["name"] for p in config["phases"]] == ["flow_matching",
                                                                   "likelihood"]
    assert [p["steps"] for p in config["phases"]] == [6, 4]
    history = read(run, "history.json")
    assert {"nll", "kinetic", "jacobian", "nfe"} <= set(history)  # the phase's, as any run's
    before, after = (p["history"] for p in history["phases"])
    assert before == read(fm_run[0], "history.json")
    assert after == {k: v for k, v in history.items() if k != "phases"}
    metrics = read(run, "metrics.json")
    assert metrics["phases"][0]["test"] == read(fm_run[0], "metrics.json")["test"]
    assert metrics["test"]["kinetic"] > 0 and metrics["resumed_from_step"] is None
    assert not (run / "checkpoint").exists()
    # Given again, the same command finds the run finished.
    again = invoke("train", "--resume", "--out", run, *FINE_TUNE)
    assert again.exit_code == 0 and "finished before" in again.output, again.output


def test_a_fine_tune_trains_the_network_flow_matching_trained(fm_run, fine_tuned):
    # "auto" picks SiLU for flow matching and softplus for the likelihood: the fine-tune
    # must not swap the activation under the trained weights (it did: one step moved
    # pinwheel's held-out NLL from 3.43 to 3.67 nats).
    before, after = load_model(fm_run[0]), load_model(fine_tuned[0])
    assert after.blocks[0].dynamics.activation == before.blocks[0].dynamics.activation == "silu"
    assert read(fine_tuned[0], "config.json")["activation"] == "silu"
    # Its weights start from flow matching's: 4 Adam steps of lr 1e-3 move each by little.
    for a, b in zip(before.trainable_variables, after.trainable_variables, strict=True):
        assert np.max(np.abs(np.asarray(a) - np.asarray(b))) < 4 * 3.2e-3, a.path


def test_what_a_fine_tune_may_not_be_given(fm_run):
    run = fm_run[0]
    assert_usage_error(invoke("train", "--resume", "--out", run, "--objective", "likelihood"),
                       "--steps N or --epochs N")
    assert_usage_error(invoke("train", "--resume", "--out", run, *FINE_TUNE, "--coupling",
                              "ot"), "--coupling ot only means")
    assert_usage_error(invoke("train", "--resume", "--out", run, *FINE_TUNE, "--lr", "0.5"),
                       "drop --lr")
    # The network is the run's: the fine-tune keeps its activation and takes no other.
    assert_usage_error(invoke("train", "--resume", "--out", run, *FINE_TUNE, "--activation",
                              "tanh"), "drop --activation")
    # Without the switch a finished run's length is its own; the error says what --steps
    # with --resume is for.
    assert_usage_error(invoke("train", "--resume", "--out", run, "--steps", "9"),
                       "finished training by flow_matching; with --resume, --steps gives a "
                       "flow-matching run a likelihood phase (--objective likelihood)")
    assert not (run / "checkpoint").exists()


def test_an_interrupted_fine_tune_resumes_to_the_same_weights(fm_run, fine_tuned, tmp_path,
                                                              monkeypatch):
    run = tmp_path / "cut"
    shutil.copytree(fm_run[0], run)
    # Ctrl-C at the fine-tune's first step: no step checkpoint yet, only the phase's start.
    result = interrupted(monkeypatch, 1, "--resume", "--out", run, *FINE_TUNE)
    assert result.exit_code == 130, result.output
    assert "again from the weights it started with" in result.output
    assert (read(run / "checkpoint", "options.json")["objective"] == "likelihood")
    assert read(run, "config.json")["objective"] == "flow_matching"  # the run it was
    # Then at its third: the checkpoint of step 2 stands.
    result = interrupted(monkeypatch, 3, "--resume", "--out", run, "--checkpoint-every", "2")
    assert result.exit_code == 130 and "checkpoint at step 2" in result.output, result.output
    result = invoke("train", "--resume", "--out", run)
    assert result.exit_code == 0, result.output
    assert read(run, "metrics.json")["resumed_from_step"] == 2
    for a, b in zip(weights(fine_tuned[0]), weights(run)):
        np.testing.assert_array_equal(a, b)
    assert read(run, "history.json")["phases"][0] == read(fine_tuned[0],
                                                          "history.json")["phases"][0]


@pytest.mark.slow  # 17 s on 2 shared cores: a run cut, resumed, evaluated, fine-tuned
def test_an_interrupted_flow_matching_run_is_trained_out_then_fine_tuned(fine_tuned, tmp_path,
                                                                        monkeypatch):
    run = tmp_path / "fm-cut"
    assert interrupted(monkeypatch, 3, *FM, "--out", run).exit_code == 130
    result = invoke("train", "--resume", "--out", run, *FINE_TUNE)
    assert result.exit_code == 0, result.output
    assert read(run, "metrics.json")["phases"][0]["steps"] == 6
    for a, b in zip(weights(fine_tuned[0]), weights(run)):
        np.testing.assert_array_equal(a, b)
    # The same network too: weights say nothing of the activation between them.
    assert load_model(run).blocks[0].dynamics.activation == "silu"


# ---------------------------------------------------------------- evaluate --


@pytest.mark.parametrize("which", ["fm_run", "fine_tuned"])
def test_evaluate_reports_the_kinetic_energy_for_either_objective(which, request):
    run = request.getfixturevalue(which)[0]
    result = invoke("evaluate", run)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert "; kinetic energy " in result.output.strip().splitlines()[-2]
    assert report["kinetic_seconds"] >= 0 and "kinetic_status" not in report
    # What trained the run, phase by phase.
    trained = "trained by flow matching (ot coupling, 6 steps)" + (
        ", then likelihood (4 steps)" if which == "fine_tuned" else "")
    assert result.output.strip().splitlines()[-2].endswith(trained)
    assert [p["steps"] for p in report["phases"]] == ([6, 4] if which == "fine_tuned" else [6])
    # The mean over the test split of the flow's per-sample kinetic integral.
    model = load_model(run)
    x, _ = runs.evaluation_data(runs.load_config(run))
    expected = np.mean(keras.ops.convert_to_numpy(
        model.penalties(x, names=["kinetic"])["kinetic"]))
    assert report["kinetic"] == pytest.approx(float(expected), rel=1e-5)
    assert report["kinetic"] == pytest.approx(read(run, "metrics.json")["test"]["kinetic"],
                                              rel=1e-5)
    quick = json.loads(invoke("evaluate", run, "--no-kinetic", "--json").output)
    assert "kinetic" not in quick and quick["nll"] == pytest.approx(report["nll"], rel=1e-6)


def test_the_activation_follows_the_objective_unless_given():
    from keras_rnode.models.factory import build_model

    likelihood = kr.TrainSettings().resolved((2,))
    flow_matching = kr.TrainSettings(objective="flow_matching").resolved((2,))
    assert (likelihood.activation, flow_matching.activation) == ("softplus", "silu")
    assert kr.TrainSettings(objective="flow_matching",
                            activation="tanh").resolved((2,)).activation == "tanh"
    options = dict(hidden=(4,), blocks=1, regularizers={}, logit_alpha=None, seed=0,
                   solver=kr.SolverSettings(), eval_solver=kr.SolverSettings(), trace="exact")
    for objective, expected in (("likelihood", "softplus"), ("flow_matching", "silu")):
        model = build_model((2,), None, objective=objective, **options)
        assert model.blocks[0].dynamics.activation == expected
    with pytest.raises(ValueError, match="--activation"):
        kr.TrainSettings(activation="relu6")
