"""keras-rnode: continuous normalizing flows trained the RNODE way, in Keras 3."""

import os
import sys

from keras_rnode.lazy import lazy_package

# TensorFlow's start-up chatter (CUDA probes, CPU features) buries the CLI's
# output; a user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
__all__ = ["MultiscaleRNODE", "RNODE", "Solution", "SolverSettings", "Status", "StepController",
           "TrainSettings", "backend", "callbacks", "datasets", "layers", "multiscale_rnode",
           "odeint", "optimizers", "resumable", "solvers"]

# Each name is imported when first read (keras_rnode.lazy): the command line
# starts without keras.
lazy_package(__name__, {
    "MultiscaleRNODE": "keras_rnode.models.multiscale",
    "multiscale_rnode": "keras_rnode.models.multiscale",
    "RNODE": "keras_rnode.models.rnode",
    "TrainSettings": "keras_rnode.train_settings",
    **{name: "keras_rnode.solvers" for name in ("Solution", "SolverSettings", "Status",
                                                "StepController", "odeint")},
}, submodules=("backend", "callbacks", "datasets", "layers", "optimizers", "resumable",
               "solvers"))

# Importing keras_rnode registers its layers and models with Keras, so that
# keras.saving.load_model finds them by name; where keras is loaded already
# that costs little, so it is done now.
if "keras" in sys.modules:
    for _name in __all__:
        getattr(sys.modules[__name__], _name)
    del _name
