"""Batches of an array without TensorFlow: a seeded, reshuffled stream as a keras.utils.PyDataset.

`make_dataset` hands these out off the TensorFlow backend (JAX, PyTorch),
where tf.data may not even be installed. The stream is a function of the
seed alone: epoch e is the permutation NumPy draws from (seed, e), so a
stream built again from batch `start` continues exactly where an earlier
one stopped (what resuming an interrupted run needs).
"""

import keras
import numpy as np


class ArrayBatches(keras.utils.PyDataset):
    """Batch i (from `start` on) of the epochs of x, reshuffled each epoch when `shuffle`.

    `repeat`: an endless stream (num_batches None: give fit a
    steps_per_epoch); otherwise one pass. `drop_remainder`: every batch has
    `batch_size` rows (a compiled step then never retraces).
    """

    def __init__(self, x, batch_size, shuffle=True, seed=0, repeat=False, drop_remainder=True,
                 start=0):
        super().__init__()
        self.x, self.batch_size, self.shuffle, self.seed = x, batch_size, shuffle, seed
        self.repeat, self.start = repeat, start
        whole, rest = divmod(len(x), batch_size)
        self.per_epoch = whole + (0 if drop_remainder or not rest else 1)

    @property
    def num_batches(self):
        return None if self.repeat else max(self.per_epoch - self.start, 0)

    def __getitem__(self, index):
        epoch, within = divmod(self.start + index, self.per_epoch)
        order = (np.random.default_rng([self.seed, epoch]).permutation(len(self.x))
                 if self.shuffle else np.arange(len(self.x)))
        return self.x[order[within * self.batch_size:(within + 1) * self.batch_size]]
