"""Training objectives: maximum likelihood with RNODE's penalties, and flow matching.

`"likelihood"` (`Likelihood()`, the default): every training step solves
the flow and minimizes bits/dim (images) or nats plus the weighted
penalties (DESIGN.md, section 2).

`FlowMatching(coupling="independent" | "ot", sigma=0.0)`, or
`"flow_matching"` for `FlowMatching()`: conditional flow matching, with no
solve and no trace in training. For a data point x (in the flow's space,
after dequantization and the logit transform) and a base draw z ~ N(0, I),
in this package's direction (data at t = 0, the base at t = T):

    z_t = (1 - t/T) x + (t/T) z + sigma * eps,  eps ~ N(0, I),  t ~ U[0, T]
    u   = (z - x) / T                           (the path's velocity)
    loss = mean over event dims of (f(t, z_t) - u)^2

Lipman et al., "Flow Matching for Generative Modeling", ICLR 2023: the
conditional flow matching loss (eq. 9) on the straight path (eq. 20-23
with sigma_min = 0); Tong et al., "Improving and generalizing flow-based
generative models with minibatch optimal transport", TMLR 2024: the
independent coupling with a constant sigma (I-CFM) and the minibatch
optimal-transport coupling (OT-CFM), which pairs the data batch with the
noise batch by the exact assignment of least total squared Euclidean
distance before t is drawn (`ot_assignment`). Their time runs from noise
(t = 0) to data (t = 1); here s = t/T runs the other way, so their x_1 is
our x and their x_0 our z, and the velocity changes sign and scale.

A model trained by flow matching is an ordinary CNF: its log-density,
samples and penalties are computed by solving the flow as for any other.
"""

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from keras_rnode import checks

COUPLINGS = ("independent", "ot")


@dataclass(frozen=True)
class Likelihood:
    """Maximum likelihood: solve the flow, minimize nats or bits/dim + the penalties."""

    name: ClassVar[str] = "likelihood"

    def to_config(self):
        return {"name": self.name}


@dataclass(frozen=True)
class FlowMatching:
    """Conditional flow matching: regress the dynamics onto the straight path's velocity.

    Args:
        coupling: "independent" (each data point with its own base draw:
            I-CFM) or "ot" (the minibatch optimal-transport assignment
            between the data batch and the noise batch: OT-CFM).
        sigma: the standard deviation of the Gaussian around the path
            (>= 0; torchcfm's default is 0.0, its examples use 0.01-0.1).

    Raises ValueError for an unknown coupling or a bad sigma.
    """

    coupling: str = "independent"
    sigma: float = 0.0
    name: ClassVar[str] = "flow_matching"

    def __post_init__(self):
        checks.one_of(self.coupling, "coupling", COUPLINGS)
        object.__setattr__(self, "sigma", checks.non_negative(self.sigma, "sigma"))

    def to_config(self):
        return {"name": self.name, **dataclasses.asdict(self)}


OBJECTIVES = {cls.name: cls for cls in (Likelihood, FlowMatching)}


def get(objective):
    """An objective from a name ("likelihood", "flow_matching"; "flow-matching" too), a
    `to_config` dict, or an objective itself. ValueError naming the known ones."""
    if isinstance(objective, tuple(OBJECTIVES.values())):
        return objective
    if isinstance(objective, dict):
        config = dict(objective)
        name = config.pop("name", None)
        return _class(name)(**config)
    return _class(objective.replace("-", "_") if isinstance(objective, str) else objective)()


def _class(name):
    if name not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)} or an objective "
                         f"such as keras_rnode.objectives.FlowMatching(coupling='ot'), got "
                         f"{name!r}")
    return OBJECTIVES[name]


def straight_path(x, z, t, end_time, sigma=0.0, eps=None):
    """(z_t, u): the point at time t (batch,) on the path from x (t = 0) to z (t = T), and
    the path's velocity (z - x) / T, both of x's shape; sigma * eps is added to z_t."""
    from keras import ops

    s = ops.reshape(t / end_time, (-1,) + (1,) * (len(x.shape) - 1))
    z_t = (1.0 - s) * x + s * z
    if sigma:
        z_t = z_t + sigma * eps
    return z_t, (z - x) / end_time


def regression_loss(f, u):
    """Mean over event dims of (f - u)^2: the flow matching loss per sample, (batch,)."""
    from keras import ops

    from keras_rnode.regularizers import event_mean

    return event_mean(ops.square(f - u))


def ot_assignment(x, z):
    """The minibatch optimal-transport pairing: indices `j` (n,) int32 such that pairing x[i]
    with z[j[i]] minimizes sum_i ||x[i] - z[j[i]]||^2 (an exact assignment problem: uniform
    weights, equal sizes; scipy.optimize.linear_sum_assignment, Jonker-Volgenant).

    x, z: NumPy arrays (n, *event_shape). O(n^3): 38-54 ms at n = 512 on one CPU
    core for the digits and the 2-D toys (benchmarks/RESULTS.md, "Flow matching").
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    n, dims = len(x), int(np.prod(np.shape(x)[1:]))
    cost = cdist(np.reshape(x, (n, dims)).astype(np.float64),
                 np.reshape(z, (n, dims)).astype(np.float64), "sqeuclidean")
    rows, cols = linear_sum_assignment(cost)
    assignment = np.empty(n, np.int32)
    assignment[rows] = cols
    return assignment
