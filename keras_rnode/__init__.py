"""keras-rnode: continuous normalizing flows trained the RNODE way, in Keras 3."""

import os
import sys
from typing import TYPE_CHECKING

from keras_rnode import lazy

# TensorFlow's start-up chatter (CUDA probes, CPU features) buries the CLI's
# output; a user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

# What tools read; at run time each name is imported when first read
# (keras_rnode.lazy): the command line starts without keras.
if TYPE_CHECKING:
    from keras_rnode import (backend, callbacks, datasets, layers, objectives, optimizers,
                             regularizers, resumable, solvers)
    from keras_rnode.models.multiscale import MultiscaleRNODE, multiscale_rnode
    from keras_rnode.models.rnode import RNODE
    from keras_rnode.train_settings import TrainSettings
    from keras_rnode.solvers import Solution, SolverSettings, Status, StepController, odeint

__all__ = ["MultiscaleRNODE", "RNODE", "Solution", "SolverSettings", "Status", "StepController",
           "TrainSettings", "backend", "callbacks", "datasets", "layers", "multiscale_rnode",
           "objectives", "odeint", "optimizers", "regularizers", "resumable", "solvers"]
__getattr__, __dir__ = lazy.attach(__name__)

# Importing keras_rnode registers its layers and models with Keras, so that
# keras.saving.load_model finds them by name; where keras is loaded already
# that costs little, so it is done now. An export whose module is not
# written yet reads as None here.
if "keras" in sys.modules:
    for _name in __all__:
        getattr(sys.modules[__name__], _name, None)
    del _name
