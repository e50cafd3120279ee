"""Training progress that reads well in a log file (issue 26).

Keras's progress bar redraws its line with backspaces and carriage
returns; written to a file (`rnode train > log`) every redraw stays, one
line per step. `fit_progress` keeps that bar on a terminal and, anywhere
else, turns it off for `PlainProgress`: a plain line every N steps with
the step, the time since training began and every logged metric (loss,
nll or bpd, each penalty, nfe).
"""

import sys
import time

import keras

EVERY = 100  # steps between lines: a 5000-step run writes 50


def fit_progress(quiet=False, every=EVERY, stream=None):
    """(verbose, callbacks) for `model.fit`: nothing when quiet; Keras's own bar on a terminal
    (verbose=1, no callback); elsewhere verbose=0 and a `PlainProgress(every, stream)`.

    `stream` is where the lines go and whose terminal-ness decides
    (sys.stdout, read when written, by default).
    """
    if quiet:
        return 0, []
    isatty = getattr(sys.stdout if stream is None else stream, "isatty", None)
    if isatty is not None and isatty():
        return 1, []
    return 0, [PlainProgress(every, stream)]


class PlainProgress(keras.callbacks.Callback):
    """A line every `every` steps of a fit, and one when it ends, written to `stream`.

    A line reads `step 300/1000  epoch 1/1  41.2s  loss 1.234  nll 1.198
    kinetic 0.01834 ...`: the step counts this fit's steps over all its
    epochs (the total when fit knows its steps per epoch), the time is
    since the fit began, and the metrics are those fit logs, as its bar
    shows them (running means over the epoch).
    """

    def __init__(self, every=EVERY, stream=None):
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every!r}")
        self.every = every
        self.stream = stream

    def on_train_begin(self, logs=None):
        self._start = time.perf_counter()
        self._first_epoch = None
        self._step = 0
        self._total = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if self._first_epoch is None:
            self._first_epoch = epoch
            steps = self.params.get("steps")
            if steps:
                self._total = (self.params["epochs"] - epoch) * steps

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step % self.every == 0 and self._step != self._total:
            self._write(logs)

    def on_train_end(self, logs=None):
        if self._step:  # the last line, also of a fit stopped early
            self._write(logs)

    def _write(self, logs):
        total = "" if self._total is None else f"/{self._total}"
        fields = [f"step {self._step}{total}",
                  f"epoch {self._epoch + 1}/{self.params['epochs']}",
                  f"{time.perf_counter() - self._start:.1f}s"]
        logs = logs or {}
        for name in sorted(logs, key=lambda name: name != "loss"):  # loss first
            value = logs[name]
            if isinstance(value, (int, float)):
                fields.append(f"{name} {value:.4g}")
        stream = sys.stdout if self.stream is None else self.stream
        stream.write("  ".join(fields) + "\n")
        stream.flush()  # `tail -f` sees each line when it is written
