"""The ODE solver: `odeint`, its settings, the step-size controller and the tableaus."""

from keras_rnode.lazy import lazy_package

__all__ = ["GRADIENTS", "METHODS", "SettingError", "Solution", "SolverSettings", "Status",
           "StepController", "odeint"]

# Each name is imported when first read (keras_rnode.lazy): the settings load
# without keras, the solver with it.
lazy_package(__name__, {
    "StepController": "keras_rnode.solvers.controller",
    "odeint": "keras_rnode.solvers.odeint",
    **{name: "keras_rnode.solvers.settings" for name in ("GRADIENTS", "METHODS", "SettingError",
                                                         "SolverSettings")},
    **{name: "keras_rnode.solvers.solution" for name in ("Solution", "Status")},
})
