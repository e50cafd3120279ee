"""scripts/recipes.py: the paper's settings, and the recipes run end to end for a couple of steps.

MNIST and CIFAR-10 download at run time; here they run on a small synthetic
stand-in put where keras.datasets' loader would be.
"""

import importlib.util
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_recipes():
    spec = importlib.util.spec_from_file_location(
        "recipes", os.path.join(ROOT, "scripts", "recipes.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


recipes = load_recipes()


def option(args, flag):
    """The value click would take for `flag`: the last one given."""
    return [args[i + 1] for i, a in enumerate(args) if a == flag][-1]


def test_recipes_carry_the_papers_settings():
    mnist = recipes.recipe_args("mnist")
    for flag, value in (("--method", "rk4"), ("--step-size", "0.25"), ("--batch-size", "200"),
                        ("--lr", "1e-3"), ("--warmup-steps", "1000"), ("--kinetic", "0.01"),
                        ("--jacobian", "0.01"), ("--eval-method", "dopri5"),
                        ("--eval-rtol", "1e-5"), ("--eval-atol", "1e-5"),
                        ("--architecture", "multiscale"), ("--blocks", "2"),
                        ("--hidden", "64,64,64")):
        assert option(mnist, flag) == value, flag
    cifar = recipes.recipe_args("cifar10")
    assert [option(cifar, f) for f in ("--method", "--rtol", "--atol")] == [
        "dopri5", "1e-5", "1e-5"]
    digits = recipes.recipe_args("digits")
    assert [option(digits, f) for f in ("--dataset", "--architecture", "--hidden", "--method",
                                        "--step-size")] == [
        "digits", "multiscale", "32,32,32", "rk4", "0.25"]


def test_overrides_win_and_steps_replace_epochs():
    args = recipes.recipe_args("mnist", out="o", devices=2, extra=["--steps", "2",
                                                                   "--batch-size", "8"])
    assert "--epochs" not in args
    assert option(args, "--steps") == "2" and option(args, "--batch-size") == "8"
    assert option(args, "--devices") == "2" and option(args, "--jit") == "auto"
    assert option(recipes.recipe_args("mnist", jit=False), "--jit") == "off"


def test_dry_run_prints_the_command_without_training(tmp_path):
    result = CliRunner().invoke(recipes.main, ["cifar10", "--dry-run", "--out",
                                               str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("rnode train --dataset cifar10")
    assert not (tmp_path / "r").exists()


def run_recipe(name, out, *extra):
    result = CliRunner().invoke(recipes.main, [name, "--out", str(out), "--", *extra])
    assert result.exit_code == 0, result.output + repr(result.exception)
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    return result.output, metrics, config


@pytest.mark.slow  # 33 s; the recipe's arguments are checked above, its model in test_multiscale
def test_digits_recipe_runs_two_steps(tmp_path):
    # The recipe's model; narrower nets (its widths are checked above), a smaller batch
    # and a fixed-step evaluation keep it quick.
    out, metrics, config = run_recipe("digits", tmp_path / "digits", "--steps", "2",
                                      "--hidden", "8", "--batch-size", "16", "--n-test", "16",
                                      "--eval-method", "rk4", "--eval-step-size", "0.5",
                                      "--quiet")
    assert "bits/dim" in out
    assert config["architecture"] == "multiscale" and config["steps"] == 2
    assert config["blocks"] == 2 and config["warmup_steps"] == 100
    assert np.isfinite(metrics["test"]["bpd"]) and metrics["test"]["bpd"] > 0
    # Two CNF blocks before and after the squeeze, two at the last of two scales.
    assert metrics["train"]["nfe"] == 6 * 16  # rk4 at step 0.25: 16 evaluations a block
    assert (tmp_path / "digits" / "samples.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_download_recipes_on_a_stand_in(tmp_path, monkeypatch, name, shape):
    import keras

    rng = np.random.default_rng(0)

    def fake_load_data():
        def images(n):
            return rng.integers(0, 256, (n, *shape), dtype=np.uint8)

        return (images(8), np.zeros(8, np.uint8)), (images(4), np.zeros(4, np.uint8))

    monkeypatch.setattr(getattr(keras.datasets, name), "load_data", fake_load_data)
    _, metrics, config = run_recipe(name, tmp_path / name, "--steps", "1", "--batch-size",
                                    "4", "--hidden", "4", "--eval-method", "rk4",
                                    "--eval-step-size", "0.5", "--quiet")
    assert config["event_shape"] == list(shape)
    assert np.isfinite(metrics["test"]["bpd"])
