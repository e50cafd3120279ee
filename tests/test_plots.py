"""What a run can draw: 2-D points and images of 1, 3 or 4 channels; other data gets no
picture, and asking for one is a clear error (not matplotlib's, after training)."""

import numpy as np
import pytest
from click.testing import CliRunner

from keras_rnode.cli import main
from keras_rnode.plots import drawable, save_samples

CHEAP = ["--steps", "2", "--batch-size", "64", "--hidden", "8", "--method", "euler",
         "--step-size", "0.5", "--eval-method", "euler", "--eval-step-size", "0.5", "--no-jit",
         "--quiet"]


@pytest.mark.parametrize("shape, ok", [((2,), True), ((3,), False), ((4, 4, 1), True),
                                       ((4, 4, 3), True), ((4, 4, 4), True),
                                       ((2, 2, 2), False), ((4, 4), False)])
def test_what_draws(shape, ok):
    assert drawable(shape) is ok


def test_samples_draw_or_say_why(tmp_path):
    rng = np.random.default_rng(0)
    for shape in ((2,), (4, 4, 1), (4, 4, 3)):
        path = tmp_path / f"s{len(shape)}{shape[-1]}.png"
        save_samples(rng.uniform(size=(9, *shape)), str(path), levels=None)
        assert path.stat().st_size > 0
    with pytest.raises(ValueError, match=r"cannot draw samples of shape \(2, 2, 2\) as a PNG "
                                         r"\(2-D points or images of 1/3/4 channels\)"):
        save_samples(rng.uniform(size=(9, 2, 2, 2)), str(tmp_path / "bad.png"))
    save_samples(rng.uniform(size=(9, 2, 2, 2)), str(tmp_path / "bad.npy"))
    assert np.load(tmp_path / "bad.npy").shape == (9, 2, 2, 2)


def test_a_run_on_two_channel_data_finishes_without_a_picture(tmp_path):
    data = tmp_path / "two_channels.npy"
    np.save(data, np.random.default_rng(0).normal(size=(300, 2, 2, 2)).astype("float32"))
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--dataset", str(data), *CHEAP, "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert {"model.keras", "config.json", "metrics.json"} <= {p.name for p in run.iterdir()}
    assert not list(run.glob("*.png"))
    drawn = CliRunner().invoke(main, ["sample", str(run), "-n", "4", "--out",
                                      str(tmp_path / "s.png")])
    assert drawn.exit_code == 1 and "cannot draw samples of shape (2, 2, 2)" in drawn.output
    assert "Traceback" not in drawn.output
