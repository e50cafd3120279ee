"""The ODE solver: `odeint`, its settings, the step-size controllers and the tableaus."""

from typing import TYPE_CHECKING

from keras_rnode import lazy

# What tools read; at run time each name is imported when first read
# (keras_rnode.lazy): the settings load without keras, the solver with it.
if TYPE_CHECKING:
    from keras_rnode.solvers.controller import Controller, StepController, register_controller
    from keras_rnode.solvers.norms import ERROR_NORMS
    from keras_rnode.solvers.pi import PIController
    from keras_rnode.solvers.solve import odeint
    from keras_rnode.solvers.settings import GRADIENTS, METHODS, SettingError, SolverSettings
    from keras_rnode.solvers.solution import Solution, Status

__all__ = ["Controller", "ERROR_NORMS", "GRADIENTS", "METHODS", "PIController", "SettingError",
           "Solution", "SolverSettings", "Status", "StepController", "odeint",
           "register_controller"]
__getattr__, __dir__ = lazy.attach(__name__)
