"""Training callbacks that turn the usual neural-ODE failures into clear outcomes.

- `NFEWatch`: the solver's function evaluations per step grow past a limit.
- `SolverFailures`: a training solve hit max_steps (or the step underflowed).
- `BadSteps`: a step had a NaN/inf loss or gradient.

Each watch warns, or stops training (`model.stop_training`) and leaves
the reason in `stop_reason`. The weights of a bad step are never applied
when the optimizer is `keras_rnode.optimizers.SkipBadSteps`, so a stopped
model holds its last good weights. Per-step checks read a few scalar
variables on the host; they work on every backend.
"""

import warnings

import keras

from keras_rnode.actions import ACTIONS
# Importable from here as it always was; its home is resumable.py, beside fit_resumable.
from keras_rnode.resumable import StepBackup  # noqa: F401
from keras_rnode.solvers.solution import Status


def _check_action(action, allowed):
    if action not in allowed:
        raise ValueError(f"action must be one of {allowed}, got {action!r}")
    return action


def _say(message):
    warnings.warn(message, RuntimeWarning, stacklevel=3)


class _Watch(keras.callbacks.Callback):
    stop_reason = None

    def _stop(self, reason):
        if self.stop_reason is None:
            self.stop_reason = reason
            _say(f"stopping training: {reason}")
        self.model.stop_training = True

    def on_train_begin(self, logs=None):
        self.stop_reason = None


class NFEWatch(_Watch):
    """Warn (or stop) when a training step's forward NFE, summed over blocks, exceeds `limit`.

    NFE growing during training means the dynamics are getting stiff: each
    step gets slower, and the run may crawl. With stop=True training ends at
    the first such step; the model keeps its weights (pair it with
    `StepBackup` to also keep the last checkpoint before it).
    """

    def __init__(self, limit, stop=False):
        super().__init__()
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
            raise ValueError(f"NFE limit must be a positive number, got {limit!r}")
        self.limit = limit
        self.stop = bool(stop)
        self.first_exceeded = None  # (epoch, batch, nfe)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.first_exceeded = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        nfe = sum(int(keras.ops.convert_to_numpy(b.stats["nfe"])) for b in self.model.blocks)
        if nfe <= self.limit:
            return
        reason = (f"NFE {nfe} in epoch {self._epoch + 1}, step {batch + 1} is past the "
                  f"limit of {self.limit:g}; the dynamics are getting stiff (try larger "
                  "kinetic/jacobian weights or a smaller learning rate)")
        if self.stop:
            self._stop(reason)
        elif self.first_exceeded is None:
            _say(reason + "; warning once")
        if self.first_exceeded is None:
            self.first_exceeded = (self._epoch, batch, nfe)


class SolverFailures(_Watch):
    """What to do when a training solve ends before T (max_steps reached, step underflow).

    The model logs `solver_failures`, the count of such steps in the epoch.
    action="warn": a warning at the end of each epoch that had any;
    "skip": the same, and the steps are not applied (the optimizer must be
    `SkipBadSteps(..., guard=model.solves_succeeded)`); "stop": training
    stops after the first such step.
    """

    def __init__(self, action="warn"):
        super().__init__()
        self.action = _check_action(action, ACTIONS)
        self.counts = []  # per epoch

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.counts = []
        if self.action == "skip":
            from keras_rnode.optimizers import SkipBadSteps

            opt = self.model.optimizer
            if not isinstance(opt, SkipBadSteps) or opt.guard is None:
                raise ValueError(
                    "SolverFailures('skip') needs the model compiled with "
                    "keras_rnode.optimizers.SkipBadSteps(optimizer, "
                    "guard=model.solves_succeeded)")

    def on_train_batch_end(self, batch, logs=None):
        if self.action == "stop" and not bool(
                keras.ops.convert_to_numpy(self.model.solves_succeeded())):
            status = Status(max(int(keras.ops.convert_to_numpy(b.stats["status"]))
                                for b in self.model.blocks))
            self._stop(f"a training solve ended with status {status.label} at step "
                       f"{batch + 1}: {status.message}")

    def on_epoch_end(self, epoch, logs=None):
        count = int(round(float((logs or {}).get("solver_failures", 0))))
        self.counts.append(count)
        if count and self.action != "stop":
            what = "skipped" if self.action == "skip" else "applied anyway"
            short = (Status.MAX_STEPS_REACHED, Status.STEP_UNDERFLOW)
            _say(f"epoch {epoch + 1}: {count} training step(s) had a solve that stopped "
                 f"short, {what}. " + " ".join(f"If {s.happened}: {s.remedy}." for s in short))


class BadSteps(_Watch):
    """Steps with a NaN/inf loss or gradient: "skip" them and report, or "stop".

    Needs the optimizer `SkipBadSteps`, which never applies such a step, so
    the model keeps its last good weights either way.
    """

    def __init__(self, action="skip"):
        super().__init__()
        self.action = _check_action(action, ("skip", "stop"))
        self.skipped = 0  # in this fit
        self.counts = []  # per epoch

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        from keras_rnode.optimizers import SkipBadSteps

        if not isinstance(self.model.optimizer, SkipBadSteps):
            raise ValueError("BadSteps needs the model compiled with "
                             "keras_rnode.optimizers.SkipBadSteps(optimizer)")
        self._start = self._total()
        self._epoch_start = self._start
        self.skipped = 0
        self.counts = []

    def _total(self):
        opt = self.model.optimizer
        return int(keras.ops.convert_to_numpy(opt.skipped)) if opt.built else 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self._start + self.skipped

    def on_train_batch_end(self, batch, logs=None):
        total = self._total()
        if total - self._start > self.skipped:
            self.skipped = total - self._start
            if self.action == "stop":
                self._stop(f"a NaN or inf loss or gradient at step {batch + 1}; the step was "
                           "not applied and the model keeps its last good weights")

    def on_epoch_end(self, epoch, logs=None):
        count = self._start + self.skipped - self._epoch_start
        self.counts.append(count)
        if logs is not None:
            logs["skipped_steps"] = count
        if count and self.action == "skip":
            _say(f"epoch {epoch + 1}: skipped {count} step(s) with a NaN or inf loss or "
                 "gradient")

