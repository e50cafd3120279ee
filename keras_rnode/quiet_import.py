"""Importing keras for a command without the lines TensorFlow's C++ side prints as it loads.

In a module free of keras, so that the command line loads it (and answers
--help) without keras.
"""

import importlib.util
import os
import sys


def load_keras(seeds=False):
    """Import keras, silencing what TensorFlow's C++ side prints while it loads and looks for
    devices (oneDNN, the CUDA probes, absl's "before InitializeLog" line).

    Those lines are written to the process's stderr before TF_CPP_MIN_LOG_LEVEL
    applies, so only its file descriptor, closed for that moment, stops them;
    TF_CPP_MIN_LOG_LEVEL=0 keeps them. `seeds`: the caller will call
    keras.utils.set_random_seed, which imports TensorFlow (to seed it) under
    every backend where it is installed: then TensorFlow loads here, quietly.
    """
    if "keras" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import keras

        if keras.config.backend() == "tensorflow" or (
                seeds and importlib.util.find_spec("tensorflow") is not None):
            import tensorflow as tf

            tf.config.list_physical_devices()  # its CUDA probe logs an error on a CPU
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
