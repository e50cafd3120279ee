"""The ODE solver: `odeint`, its settings, the step-size controller and the tableaus."""

from typing import TYPE_CHECKING

from keras_rnode import lazy

# What tools read; at run time each name is imported when first read
# (keras_rnode.lazy): the settings load without keras, the solver with it.
if TYPE_CHECKING:
    from keras_rnode.solvers.controller import StepController
    from keras_rnode.solvers.odeint import odeint
    from keras_rnode.solvers.settings import GRADIENTS, METHODS, SettingError, SolverSettings
    from keras_rnode.solvers.solution import Solution, Status

__all__ = ["GRADIENTS", "METHODS", "SettingError", "Solution", "SolverSettings", "Status",
           "StepController", "odeint"]
__getattr__, __dir__ = lazy.attach(__name__)
