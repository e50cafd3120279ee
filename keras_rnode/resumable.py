"""Training that can be interrupted at any step and resumed to the same weights.

Keras's `BackupAndRestore` restores weights and the epoch, then reruns the
interrupted epoch from its start; with a shuffled stream that changes the
data each step sees, so the resumed run drifts from an uninterrupted one.
Here the input is one seeded stream of batches (`make_data(start)` gives
it from batch `start` on), `StepBackup` records the global step with
every checkpoint, and the rest of an interrupted epoch is trained as a
short epoch of its own before whole epochs follow. Weights, optimizer
state and random-seed states all come back, so the final weights equal
those of an uninterrupted run on the same machine and backend.
"""

import contextlib
import json
import os

import keras
import numpy as np

from keras_rnode.backend.distribute import fit_input


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


def phases(start, steps_per_epoch, epochs):
    """[(first step, initial_epoch, epochs, steps_per_epoch)] of the fits that finish a run.

    A run of `epochs` epochs of `steps_per_epoch` steps, `start` steps of
    which are done: first the rest of the current epoch, then whole epochs.
    """
    if start < 0 or start > steps_per_epoch * epochs:
        raise ValueError(f"start step {start} is outside the run's "
                         f"{steps_per_epoch * epochs} steps")
    out = []
    epoch, done = divmod(start, steps_per_epoch)
    if done:
        out.append((start, epoch, epoch + 1, steps_per_epoch - done))
        epoch += 1
    if epoch < epochs:
        out.append((epoch * steps_per_epoch, epoch, epochs, steps_per_epoch))
    return out


def fit_resumable(model, make_data, steps_per_epoch, epochs, backup_dir, checkpoint_every,
                  callbacks=(), verbose=1):
    """Train `model` for epochs x steps_per_epoch steps, checkpointing into backup_dir.

    `make_data(start)`: the seeded stream of batches (a tf.data.Dataset or
    a keras.utils.PyDataset) from batch `start` on, built afresh at each
    call, e.g. `lambda start: make_dataset(x, b, seed=s, repeat=True,
    start=start)`: a shuffled tf.data set reshuffles at each new iterator,
    so reusing one object for two phases would feed the second a different
    order.

    Continues from the checkpoint in backup_dir if there is one. Returns
    (history: metric -> per-epoch list, the step resumed from or None).
    Training stopped by a callback (`model.stop_training`) ends the run
    early; the checkpoint then stays as it was last saved.
    """
    strategy = getattr(model, "distribute_strategy", None)  # variables belong in its scope
    if not model.built:  # a checkpoint can only be loaded into a built model
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            model.build(_batch_shape(make_data(0)))
    resumed = StepBackup.resume_step(backup_dir)
    backup = StepBackup(backup_dir, checkpoint_every)
    history = {}
    plan = phases(resumed or 0, steps_per_epoch, epochs)
    if not plan:  # a finished run: only its weights to bring back
        backup.set_model(model)
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            backup.on_train_begin()  # may build the optimizer: its variables too
    for first, initial_epoch, last_epoch, steps in plan:
        result = model.fit(fit_input(model, make_data, first), initial_epoch=initial_epoch,
                           epochs=last_epoch, steps_per_epoch=steps, verbose=verbose,
                           shuffle=False, callbacks=[backup, *callbacks])
        for key, values in result.history.items():
            history.setdefault(key, []).extend(values)
        if model.stop_training:
            break
    return history, resumed


def _batch_shape(data):
    """The shape of the model input in a batch of `data` (the x of an (x, context) pair)."""
    if hasattr(data, "element_spec"):  # tf.data: known without drawing a batch
        spec = data.element_spec
        return tuple((spec[0] if isinstance(spec, tuple) else spec).shape)
    batch = data[0]
    return tuple((batch[0] if isinstance(batch, tuple) else batch).shape)
