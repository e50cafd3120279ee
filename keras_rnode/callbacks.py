"""Training callbacks that turn the usual neural-ODE failures into clear outcomes.

- `NFEWatch`: the solver's function evaluations per step grow past a limit.
- `SolverFailures`: a training solve hit max_steps (or the step underflowed).
- `BadSteps`: a step had a NaN/inf loss or gradient.
- `StepBackup`: `keras.callbacks.BackupAndRestore` that saves every N steps
  atomically and can resume at the exact step.

Each watch warns, or stops training (`model.stop_training`) and leaves
the reason in `stop_reason`. The weights of a bad step are never applied
when the optimizer is `keras_rnode.optimizers.SkipBadSteps`, so a stopped
model holds its last good weights. Per-step checks read a few scalar
variables on the host; they work on every backend.
"""

import json
import os
import warnings

import keras
import numpy as np

from keras_rnode.actions import ACTIONS
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


class StepBackup(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` that saves every `save_freq` steps, atomically, and knows the step.

    Each save writes fresh files (model and optimizer state, and the
    states of the layers' random seed generators) and then atomically replaces
    `training_metadata.json`, which names it, so a process killed at any
    moment leaves a consistent checkpoint. The metadata also records the
    global step, so a caller that skips that many batches of a seeded input
    stream (`resume_step`) continues exactly where the run stopped. The
    checkpoint is kept after training (delete_checkpoint=False by default).
    Training stopped by a watch (`model.stop_training`) leaves the last
    periodic checkpoint in place; a normal end saves the final state.
    """

    def __init__(self, backup_dir, save_freq, delete_checkpoint=False):
        if isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1:
            raise ValueError(f"save_freq must be a positive number of steps, got {save_freq!r}")
        super().__init__(backup_dir, save_freq=save_freq, delete_checkpoint=delete_checkpoint)
        self.step = 0

    @staticmethod
    def resume_step(backup_dir):
        """The global step of the checkpoint in backup_dir, or None if there is none."""
        meta = StepBackup._read_metadata(backup_dir)
        return None if meta is None else int(meta["step"])

    @staticmethod
    def _read_metadata(backup_dir):
        path = os.path.join(backup_dir, "training_metadata.json")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    # Overrides a private BackupAndRestore hook, as _save_model does; the
    # private names StepBackup uses are checked by tests/test_keras_private_api.py.
    def _load_model(self):
        meta = self._read_metadata(self.backup_dir)
        if meta is None:
            return
        if not self.model.built:
            raise ValueError("StepBackup: build the model (call it on a batch) before fit")
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(os.path.join(self.backup_dir, meta["weights"]))
        if meta.get("seeds"):
            with np.load(os.path.join(self.backup_dir, meta["seeds"])) as saved:
                states = self._seed_states()
                if len(saved.files) != len(states):
                    raise ValueError(f"{self.backup_dir}: the checkpoint has {len(saved.files)} "
                                     f"random-seed states, this model {len(states)}; it is "
                                     "not this model's checkpoint")
                for i, state in enumerate(states):
                    state.assign(saved[f"seed_{i}"])
        # Private Keras state that fit and the base callback resume from
        # (tests/test_keras_private_api.py).
        self.model._initial_epoch = int(meta["epoch"]) or None
        self.step = int(meta["step"])
        self._current_epoch = int(meta["epoch"])

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        super().on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)  # save_freq is an int: counts, does not save

    def on_train_end(self, logs=None):
        if not self.model.stop_training:
            self._save_model()
        super().on_train_end(logs)

    # A private hook the base calls every save_freq steps (tests/test_keras_private_api.py).
    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        old = self._read_metadata(self.backup_dir)
        name = f"step-{self.step:09d}.weights.h5"
        path = os.path.join(self.backup_dir, name)
        self.model.save_weights(path, overwrite=True)
        seeds = f"step-{self.step:09d}.seeds.npz"
        np.savez(os.path.join(self.backup_dir, seeds),
                 **{f"seed_{i}": keras.ops.convert_to_numpy(v)
                    for i, v in enumerate(self._seed_states())})
        # The base callback's private counters (tests/test_keras_private_api.py).
        meta = {"epoch": self._current_epoch, "batch": self._last_batch_seen,
                "step": self.step, "weights": name, "seeds": seeds}
        tmp = os.path.join(self.backup_dir, "training_metadata.json.partial")
        with open(tmp, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.backup_dir, "training_metadata.json"))
        if old is not None and old["weights"] != name:
            for key in ("weights", "seeds"):
                try:
                    os.remove(os.path.join(self.backup_dir, old[key]))
                except (FileNotFoundError, KeyError):
                    pass

    def _seed_states(self):
        # save_weights leaves out the seed generators (Hutchinson noise,
        # dequantization); an exact resume needs their states too.
        return [v for v in self.model.variables if v.name == "seed_generator_state"]

