"""What a solve returns: the final state and its statistics."""

from dataclasses import dataclass

import keras


class Status:
    """Integer codes of `Solution.stats["status"]`."""

    SUCCESS = 0
    MAX_STEPS_REACHED = 1
    STEP_UNDERFLOW = 2
    # The state went NaN or inf: a fixed-step solve stops there; an adaptive
    # one (which rejects such steps) reaches t1 with a NaN in a state left
    # out of error control. A NaN step size is a step underflow.
    NON_FINITE_STATE = 3

    NAMES = {0: "success", 1: "max_steps_reached", 2: "step_underflow",
             3: "non_finite_state"}

    @classmethod
    def name(cls, code):
        return cls.NAMES[int(code)]


@dataclass
class Solution:
    """`y`: the state at t1, in the structure of y0.

    `stats`: {"nfe", "accepted", "rejected", "status"} as int32 tensors;
    `status` codes are those of `Status`. When the solve stopped early
    (max_steps reached, step underflow, a non-finite state) `y` is the
    state where it stopped.
    """

    y: object
    stats: dict

    @property
    def status(self):
        """The status as a name ("success", "max_steps_reached", ...); eager only."""
        return Status.name(keras.ops.convert_to_numpy(self.stats["status"]))

    @property
    def succeeded(self):
        return self.status == "success"
