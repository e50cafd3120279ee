"""Step-size controllers: the interface any controller can implement, PI against integral,
serialization (also of configs saved before controllers had names), and the Status enum.

References: a tight scipy DOP853 solve in float64, and the step counts a
controller's rule implies. The integral controller's match with scipy's
RK45, step for step, is in test_solver.py.
"""

import json
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.integrate
from keras import ops

import keras_rnode as kr
from keras_rnode.solvers import Controller, PIController, StepController, register_controller
from keras_rnode.solvers.settings import SettingError, SolverSettings
from tests.backend_utils import MODES, compiled, f64, np_
from tests.test_solver import _van_der_pol

pytestmark = pytest.mark.backends


def stats(sol):
    return {k: int(np_(v)) for k, v in sol.stats.items()}


def _solve_van_der_pol(mu, tol, controller):
    """(error against a DOP853 reference at 1e-13, stats) over about one period, 2 mu."""
    func, func_np = _van_der_pol(mu)
    t1 = 2.0 * mu
    reference = scipy.integrate.solve_ivp(func_np, (0.0, t1), [2.0, 0.0], method="DOP853",
                                          rtol=1e-13, atol=1e-13).y[:, -1]
    sol = kr.odeint(func, f64([[2.0, 0.0]]), 0.0, t1, rtol=tol, atol=tol, gradient="none",
                    controller=controller, max_steps=10_000)
    assert sol.status == "success"
    return float(np.max(np.abs(np_(sol.y)[0] - reference))), stats(sol)


# --------------------------------------------------------------------------
# The PI controller against the integral one.


def test_pi_without_proportional_gain_is_the_integral_controller():
    integral = _solve_van_der_pol(5.0, 1e-5, StepController())
    assert _solve_van_der_pol(5.0, 1e-5, PIController(pcoeff=0.0, icoeff=1.0)) == integral


@pytest.mark.parametrize("mu, tol", [(5.0, 1e-5), (10.0, 1e-4)])
def test_pi_controller_rejects_fewer_steps_at_the_same_accuracy(mu, tol):
    # Van der Pol with mu = 5..10: relaxation oscillations, mildly stiff on
    # the slow branches, where the integral controller's steps swing and
    # get rejected (10 and 27 of them here, against 5 and 12).
    i_error, i_stats = _solve_van_der_pol(mu, tol, StepController())
    pi_error, pi_stats = _solve_van_der_pol(mu, tol, PIController())
    # The same accuracy: the global error of both within a few tolerances.
    assert i_error < 5 * tol and pi_error < 5 * tol, (i_error, pi_error)
    assert pi_stats["rejected"] <= 0.6 * i_stats["rejected"], (pi_stats, i_stats)
    # Not bought with many more steps: the damped steps are a little shorter.
    assert pi_stats["nfe"] <= 1.25 * i_stats["nfe"], (pi_stats, i_stats)


@pytest.mark.parametrize("kwargs, match", [
    (dict(pcoeff=-0.1), "pcoeff must be a number >= 0"),
    (dict(icoeff=0.0), "icoeff must be a positive finite number"),
    (dict(safety=1.5), "safety <= 1"),
    (dict(rtol=-1.0), "rtol must be a positive finite number"),
    (dict(error_norm="max"), "error_norm must be one of"),
])
def test_bad_pi_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PIController(**kwargs)


# --------------------------------------------------------------------------
# A controller of one's own.


@register_controller(name="test_controllers.Doubling")
@dataclass(frozen=True)
class Doubling(Controller):
    """Accepts what the norm allows; then doubles the step, or halves it after a rejection."""

    growth: float = 2.0

    def initial_state(self, dtype):
        return {}

    def adapt(self, norm, state, order):
        accept = norm <= 1.0
        return accept, ops.where(accept, self.growth, 0.5), state


def test_a_controller_of_ones_own_steers_the_solve():
    # y' = -y from a first step of 0.01 that doubles: 0.01 (2^n - 1) >= 1
    # after n = 7 steps (the last one clipped to t1), none rejected at 1e-2.
    sol = kr.odeint(lambda t, y: -y, f64([1.0]), 0.0, 1.0, rtol=1e-2, atol=1e-2,
                    first_step=0.01, controller=Doubling(), gradient="none")
    assert stats(sol)["accepted"] == 7 and stats(sol)["rejected"] == 0
    # Its norm is the base class's: a tight tolerance rejects the long steps.
    tight = kr.odeint(lambda t, y: -y, f64([1.0]), 0.0, 1.0, rtol=1e-9, atol=1e-9,
                      first_step=0.01, controller=Doubling(), gradient="none")
    assert stats(tight)["rejected"] > 0 and tight.status == "success"
    np.testing.assert_allclose(np_(tight.y), [np.exp(-1.0)], rtol=1e-7)


def test_controllers_serialize_by_name_and_fields():
    for controller in (StepController(safety=0.8), PIController(pcoeff=0.2, icoeff=0.65),
                       Doubling(growth=3.0)):
        settings = SolverSettings(rtol=1e-4, atol=1e-6, error_norm="per_sample",
                                  controller=controller)
        config = json.loads(json.dumps(settings.to_config()))
        assert config["rtol"] == 1e-4 and "rtol" not in config["controller"]["config"]
        loaded = SolverSettings.from_config(config)
        assert loaded == settings and type(loaded.controller) is type(controller)
        assert loaded.controller.rtol == 1e-4 and loaded.error_norm == "per_sample"


def test_configs_saved_before_controllers_had_names_load():
    # What SolverSettings.to_config wrote before: flat tolerances, the
    # controller as StepController's fields, no error_norm.
    old = {"method": "dopri5", "rtol": 1e-4, "atol": 1e-6, "step_size": None,
           "max_steps": 500, "gradient": "adjoint", "first_step": None,
           "controller": {"safety": 0.8, "min_factor": 0.2, "max_factor": 5.0}}
    settings = SolverSettings.from_config(old)
    assert settings.controller == StepController(safety=0.8, max_factor=5.0, rtol=1e-4,
                                                 atol=1e-6, error_norm="rms")
    assert (settings.rtol, settings.atol, settings.error_norm) == (1e-4, 1e-6, "rms")


def test_unregistered_and_unknown_controllers_are_clear_errors():
    @dataclass(frozen=True)
    class Unregistered(Doubling):
        pass

    settings = SolverSettings(controller=Unregistered())
    with pytest.raises(ValueError, match=r"register_controller\(Unregistered\)"):
        settings.to_config()
    config = SolverSettings().to_config()
    config["controller"] = {"class_name": "Nowhere", "config": {}}
    with pytest.raises(ValueError, match="unknown step controller 'Nowhere'"):
        SolverSettings.from_config(config)
    with pytest.raises(SettingError, match=r"controller must be a step controller.*lacks "
                                           r"\['replace', 'initial_state'"):
        SolverSettings(controller=object())


def test_the_tolerances_belong_to_the_controller():
    # Given to the settings, they reach the controller; a controller's own
    # are kept unless given; a new controller that leaves them unset keeps
    # the settings' (a switch of controller never resets a tolerance).
    settings = SolverSettings(rtol=1e-3)
    assert settings.controller.rtol == settings.rtol == 1e-3 and settings.atol == 1e-5
    assert SolverSettings(controller=PIController(rtol=1e-4)).rtol == 1e-4
    assert SolverSettings(rtol=1e-6, controller=PIController(rtol=1e-4)).rtol == 1e-6
    switched = settings.replace(controller=PIController())
    assert isinstance(switched.controller, PIController) and switched.rtol == 1e-3
    assert settings.replace(controller=PIController(atol=1e-7)).atol == 1e-7
    assert settings.for_evaluation(rtol=1e-6).controller.rtol == 1e-6
    with pytest.raises(SettingError, match="rtol must be a positive finite number"):
        SolverSettings(rtol=0.0)


def test_pi_controller_compiles():
    # Its state (the last error, in the state's dtype) goes through the
    # compiled loops (XLA on TensorFlow, jax.jit): the same steps as eager.
    func, _ = _van_der_pol(5.0)
    run = compiled(lambda y: kr.odeint(func, y, 0.0, 5.0, rtol=1e-5, atol=1e-5,
                                       controller=PIController(), gradient="none").stats,
                   MODES[-1])
    eager = stats(kr.odeint(func, f64([[2.0, 0.0]]), 0.0, 5.0, rtol=1e-5, atol=1e-5,
                            controller=PIController(), gradient="none"))
    assert {k: int(np_(v)) for k, v in run(f64([[2.0, 0.0]])).items()} == eager


# --------------------------------------------------------------------------
# Status: an enum whose members carry their message.


def test_status_codes_names_and_messages():
    assert [int(s) for s in kr.Status] == [0, 1, 2, 3]
    assert [s.label for s in kr.Status] == ["success", "max_steps_reached", "step_underflow",
                                           "non_finite_state"]
    for status in kr.Status:
        assert status.happened and status.remedy
        assert status.message == f"{status.happened}; {status.remedy}"
    assert "max_steps" in kr.Status.MAX_STEPS_REACHED.remedy
    sol = kr.odeint(lambda t, y: -50.0 * y, f64([1.0]), rtol=1e-9, atol=1e-9, max_steps=3)
    assert sol.status == "max_steps_reached"
    assert kr.Status(int(np_(sol.stats["status"]))) is kr.Status.MAX_STEPS_REACHED
    assert str(np_(sol.stats["status"]).dtype) == "int32"
