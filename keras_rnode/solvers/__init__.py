"""The ODE solver: `odeint`, its settings, the step-size controllers and the tableaus."""

from keras_rnode.lazy import lazy_package

__all__ = ["Controller", "ERROR_NORMS", "GRADIENTS", "METHODS", "PIController", "SettingError",
           "Solution", "SolverSettings", "Status", "StepController", "odeint",
           "register_controller"]

# Each name is imported when first read (keras_rnode.lazy): the settings load
# without keras, the solver with it.
lazy_package(__name__, {
    **{name: "keras_rnode.solvers.controller" for name in ("Controller", "StepController",
                                                           "register_controller")},
    "ERROR_NORMS": "keras_rnode.solvers.norms",
    "PIController": "keras_rnode.solvers.pi",
    "odeint": "keras_rnode.solvers.odeint",
    **{name: "keras_rnode.solvers.settings" for name in ("GRADIENTS", "METHODS", "SettingError",
                                                         "SolverSettings")},
    **{name: "keras_rnode.solvers.solution" for name in ("Solution", "Status")},
})
