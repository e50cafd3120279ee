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

from keras_rnode.backend.distribute import fit_input
from keras_rnode.callbacks import StepBackup


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
