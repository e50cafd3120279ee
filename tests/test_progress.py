"""Progress written to a file is plain lines every N steps; a terminal keeps Keras's bar."""

import io

import keras
import numpy as np
import pytest

from keras_rnode.progress import PlainProgress, fit_progress

pytestmark = pytest.mark.backends

ROWS, BATCH, EPOCHS, EVERY = 40, 8, 2, 3
STEPS = EPOCHS * ROWS // BATCH


def tiny_fit(verbose, callbacks):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    x = np.random.default_rng(0).normal(size=(ROWS, 2)).astype("float32")
    return model.fit(x, x[:, :1], batch_size=BATCH, epochs=EPOCHS, shuffle=False,
                     verbose=verbose, callbacks=callbacks).history


class StopAt(keras.callbacks.Callback):
    def __init__(self, step):
        super().__init__()
        self.step, self.seen = step, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.step:
            self.model.stop_training = True


def test_off_a_terminal_a_plain_line_every_n_steps(capsys):
    verbose, callbacks = fit_progress(every=EVERY)  # stdout is pytest's capture, not a tty
    assert verbose == 0 and [type(c) for c in callbacks] == [PlainProgress]
    history = tiny_fit(verbose, callbacks)
    out = capsys.readouterr().out
    assert not set(out) & {"\x1b", "\r", "\b"}, repr(out[:200])
    lines = out.splitlines()
    expected = [*range(EVERY, STEPS, EVERY), STEPS]
    assert len(lines) == len(expected), out
    per_epoch = STEPS // EPOCHS
    for line, step in zip(lines, expected):
        fields = line.split("  ")
        assert fields[0] == f"step {step}/{STEPS}", line
        assert fields[1] == f"epoch {(step - 1) // per_epoch + 1}/{EPOCHS}", line
        assert fields[2].endswith("s") and float(fields[2][:-1]) >= 0, line
        assert fields[3].startswith("loss ") and any(f.startswith("mae ") for f in fields), line
    # The last line is what fit logged at the end.
    assert f"loss {history['loss'][-1]:.4g}" in lines[-1].split("  ")
    assert f"mae {history['mae'][-1]:.4g}" in lines[-1].split("  ")


def test_a_stopped_fit_ends_with_the_step_it_stopped_at():
    stream = io.StringIO()
    verbose, callbacks = fit_progress(every=EVERY, stream=stream)
    tiny_fit(verbose, [*callbacks, StopAt(EVERY + 1)])
    lines = stream.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines] == [f"step {EVERY}/{STEPS}",
                                                       f"step {EVERY + 1}/{STEPS}"]


def test_a_terminal_keeps_keras_bar_and_quiet_prints_nothing():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert fit_progress(stream=Terminal()) == (1, [])
    assert fit_progress(quiet=True, stream=io.StringIO()) == (0, [])


@pytest.mark.parametrize("every", [0, -5, 2.5, True, "100"])
def test_every_must_be_a_positive_number_of_steps(every):
    with pytest.raises(ValueError, match="positive number of steps"):
        PlainProgress(every)
