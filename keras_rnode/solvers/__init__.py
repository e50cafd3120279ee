"""The ODE solver: `odeint`, its settings, the step-size controller and the tableaus."""

from keras_rnode.solvers.controller import StepController
from keras_rnode.solvers.odeint import odeint
from keras_rnode.solvers.settings import GRADIENTS, METHODS, SettingError, SolverSettings
from keras_rnode.solvers.solution import Solution, Status

__all__ = ["GRADIENTS", "METHODS", "SettingError", "Solution", "SolverSettings", "Status",
           "StepController", "odeint"]
