"""FFJORD's eight 2-D toy distributions, drawn i.i.d. from a seeded numpy Generator.

The shapes and scalings follow the FFJORD paper's generators (so that
nats reported here compare with theirs), but every sample is drawn
independently: where FFJORD splits a batch evenly between rings, arms or
spirals, here each point picks its component at random. That component is
the point's label (`toy(..., labels=True)`), for class-conditional flows.
"""

import math

import numpy as np

from keras_rnode import checks

# Differential entropy (nats) of "8gaussians": the mixture of eight
# N(c_k / 1.414, (0.5 / 1.414)^2 I), centres c_k at radius 4 every 45 degrees.
# Computed once by quadrature of -p log p (a 4001^2 grid and, independently,
# scipy's adaptive dblquad over one 45-degree wedge, both 2.8318804061);
# well-separated components would give log 8 + log(2 pi e sigma^2) = 2.8382,
# the small overlap of neighbours lowers it by 0.006.
EIGHT_GAUSSIANS_ENTROPY = 2.8318804061

# FFJORD divides the 8gaussians samples by this literal, not by sqrt(2).
_FFJORD_DIVISOR = 1.414


def _eight_gaussians(rng, n):
    component = rng.integers(0, 8, size=n)
    angles = component * (np.pi / 4)
    centres = 4.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return (centres + 0.5 * rng.standard_normal((n, 2))) / _FFJORD_DIVISOR, component


def _pinwheel(rng, n):
    arms, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    arm = rng.integers(0, arms, size=n)
    feat = rng.standard_normal((n, 2)) * np.array([radial_std, tangential_std])
    feat[:, 0] += 1.0
    # The twist grows with the radial coordinate, which bends each arm.
    angle = arm * (2 * np.pi / arms) + rate * np.exp(feat[:, 0])
    c, s = np.cos(angle), np.sin(angle)
    x = feat[:, 0] * c + feat[:, 1] * s
    y = -feat[:, 0] * s + feat[:, 1] * c
    return 2.0 * np.stack([x, y], axis=1), arm


def _checkerboard(rng, n):
    # Uniform on the 8 unit cells of [-2, 2)^2 whose floor(x) + floor(y) is
    # even, then scaled by 2: 8 squares of side 2 in [-4, 4)^2, area 32.
    x = rng.uniform(-2.0, 2.0, size=n)
    pick = rng.integers(0, 2, size=n)
    row = pick * 2 - 2 + (np.floor(x) % 2)
    y = row + rng.uniform(0.0, 1.0, size=n)
    return 2.0 * np.stack([x, y], axis=1), 2 * (np.floor(x) + 2) + pick  # the cell


def _two_spirals(rng, n):
    # sqrt spreads points about evenly along the arc (its length grows like
    # t^2); the spiral turns through 540 degrees.
    t = np.sqrt(rng.uniform(size=n)) * (3 * np.pi)
    x = -np.cos(t) * t + 0.5 * rng.uniform(size=n)
    y = np.sin(t) * t + 0.5 * rng.uniform(size=n)
    sign = rng.choice([-1.0, 1.0], size=n)
    pts = sign[:, None] * np.stack([x, y], axis=1) / 3.0
    return pts + 0.1 * rng.standard_normal((n, 2)), sign > 0


def _moons(rng, n):
    t = rng.uniform(0.0, np.pi, size=n)
    upper = rng.integers(0, 2, size=n).astype(bool)
    x = np.where(upper, np.cos(t), 1.0 - np.cos(t))
    y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
    pts = np.stack([x, y], axis=1) + 0.1 * rng.standard_normal((n, 2))
    return 2.0 * pts + np.array([-1.0, -0.2]), upper


def _rings(rng, n):
    ring = rng.choice(4, size=n)
    radius = 3.0 * np.array([1.0, 0.75, 0.5, 0.25])[ring]
    t = rng.uniform(0.0, 2 * np.pi, size=n)
    pts = radius[:, None] * np.stack([np.cos(t), np.sin(t)], axis=1)
    return pts + 0.08 * rng.standard_normal((n, 2)), ring


def _swissroll(rng, n):
    u = rng.uniform(size=n)
    t = 1.5 * np.pi * (1.0 + 2.0 * u)
    pts = t[:, None] * np.stack([np.cos(t), np.sin(t)], axis=1)
    return (pts + rng.standard_normal((n, 2))) / 5.0, np.floor(4 * u)  # the quarter of the roll


def _circles(rng, n):
    circle = rng.choice(2, size=n)
    radius = np.array([1.0, 0.5])[circle]
    t = rng.uniform(0.0, 2 * np.pi, size=n)
    pts = radius[:, None] * np.stack([np.cos(t), np.sin(t)], axis=1)
    return 3.0 * (pts + 0.08 * rng.standard_normal((n, 2))), circle


_GENERATORS = {
    "8gaussians": _eight_gaussians,
    "pinwheel": _pinwheel,
    "checkerboard": _checkerboard,
    "2spirals": _two_spirals,
    "moons": _moons,
    "rings": _rings,
    "swissroll": _swissroll,
    "circles": _circles,
}

TOY_NAMES = tuple(_GENERATORS)
TOY_CLASSES = {"8gaussians": 8, "pinwheel": 5, "checkerboard": 8, "2spirals": 2, "moons": 2,
               "rings": 4, "swissroll": 4, "circles": 2}

_ENTROPIES = {
    "checkerboard": math.log(32.0),
    "8gaussians": EIGHT_GAUSSIANS_ENTROPY,
}


def _check_name(name):
    if name not in _GENERATORS:
        raise ValueError(
            f"Unknown toy distribution {name!r}; valid names: {', '.join(TOY_NAMES)}"
        )


def toy(name, n, seed=0, labels=False):
    """Draw n points of the named toy distribution: float32 array (n, 2).

    With labels=True, (points, labels): labels int64 (n,) in 0..TOY_CLASSES[name]-1,
    the component each point was drawn from (a Gaussian, an arm, a ring, a
    cell of the board, a quarter of the swiss roll). The same (name, n,
    seed) always gives the same points, with or without labels.
    """
    _check_name(name)
    n = checks.integer(n, "n")
    rng = np.random.default_rng(seed)
    points, label = _GENERATORS[name](rng, n)
    points = points.astype(np.float32)
    return (points, np.asarray(label).astype(np.int64)) if labels else points


def toy_entropy(name):
    """Differential entropy in nats of the named distribution, or None if unknown.

    Known: "checkerboard" (uniform on area 32: log 32) and "8gaussians"
    (by quadrature, see EIGHT_GAUSSIANS_ENTROPY). A model's test NLL in
    nats cannot go below this figure.
    """
    _check_name(name)
    return _ENTROPIES.get(name)
