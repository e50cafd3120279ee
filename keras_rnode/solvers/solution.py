"""What a solve returns: the final state and its statistics."""

import enum
from dataclasses import dataclass

import keras


class Status(enum.IntEnum):
    """How a solve ended: the int codes of `Solution.stats["status"]`, each with its message.

    `Status(code)` is the member of an int code (0..3); `.label` is its
    name as `Solution.status` gives it ("max_steps_reached"); `.happened`
    says what happened, `.remedy` what to do, and `.message` both, for
    whoever reports a failed solve.
    """

    def __new__(cls, code, happened, remedy):
        member = int.__new__(cls, code)
        member._value_ = code
        member.happened = happened
        member.remedy = remedy
        return member

    SUCCESS = 0, "the solve reached t1", "nothing to do"
    MAX_STEPS_REACHED = (1, "the solve used up max_steps before it reached t1",
                         "raise max_steps or loosen the tolerances (rtol, atol)")
    # Also where the step became NaN (NaN derivatives everywhere ahead).
    STEP_UNDERFLOW = (2, "the step size fell below what t can resolve (the dynamics too "
                         "stiff there, or NaN)", "loosen the tolerances, or check the "
                         "dynamics and the data for NaN")
    # A fixed-step solve stops at the first non-finite state; an adaptive one
    # (which rejects such steps) reaches t1 with a NaN in a state left out of
    # error control.
    NON_FINITE_STATE = (3, "the state went NaN or inf", "take a smaller step or the "
                           "adaptive dopri5, or check the data")

    @property
    def label(self):
        """The name as `Solution.status` gives it: "success", "max_steps_reached", ..."""
        return self.name.lower()

    @property
    def message(self):
        """What happened and what to do, as one clause: "the state went NaN or inf; take ..."."""
        return f"{self.happened}; {self.remedy}"


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
        return Status(int(keras.ops.convert_to_numpy(self.stats["status"]))).label

    @property
    def succeeded(self):
        return self.status == "success"
