"""keras-rnode: continuous normalizing flows trained the RNODE way, in Keras 3."""

import os

# TensorFlow's start-up chatter (CUDA probes, CPU features) buries the CLI's
# output; a user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_rnode import backend, callbacks, datasets, layers, optimizers, resumable, solvers
from keras_rnode.models.multiscale import MultiscaleRNODE, multiscale_rnode
from keras_rnode.models.rnode import RNODE
from keras_rnode.solvers import Solution, SolverSettings, Status, StepController, odeint

__version__ = "0.1.0"
__all__ = ["MultiscaleRNODE", "RNODE", "Solution", "SolverSettings", "Status", "StepController",
           "backend", "callbacks", "datasets", "layers", "multiscale_rnode", "odeint",
           "optimizers", "resumable", "solvers"]
