"""Butcher tableaus of the explicit Runge-Kutta methods the solver offers."""

from dataclasses import dataclass
from fractions import Fraction as F


@dataclass(frozen=True)
class Tableau:
    """An explicit Runge-Kutta method.

    `a[i]` holds the coefficients of stage i + 1 (stage 0 needs none);
    `error` holds b - b_hat of an embedded pair (None for fixed-step
    methods). `fsal`: the last stage is evaluated at the new point, so it
    is the next step's first stage.
    """

    name: str
    c: tuple
    a: tuple
    b: tuple
    error: tuple | None = None
    order: int = 1
    fsal: bool = False

    @property
    def stages(self):
        return len(self.c)

    @property
    def adaptive(self):
        return self.error is not None


def _floats(rows):
    return tuple(tuple(float(v) for v in row) for row in rows)


_DP_B = (F(35, 384), 0, F(500, 1113), F(125, 192), F(-2187, 6784), F(11, 84), 0)
_DP_B_HAT = (
    F(5179, 57600), 0, F(7571, 16695), F(393, 640), F(-92097, 339200),
    F(187, 2100), F(1, 40),
)

DOPRI5 = Tableau(
    name="dopri5",
    c=tuple(float(v) for v in (0, F(1, 5), F(3, 10), F(4, 5), F(8, 9), 1, 1)),
    a=_floats((
        (F(1, 5),),
        (F(3, 40), F(9, 40)),
        (F(44, 45), F(-56, 15), F(32, 9)),
        (F(19372, 6561), F(-25360, 2187), F(64448, 6561), F(-212, 729)),
        (F(9017, 3168), F(-355, 33), F(46732, 5247), F(49, 176), F(-5103, 18656)),
        _DP_B[:6],
    )),
    b=tuple(float(v) for v in _DP_B),
    error=tuple(float(b - bh) for b, bh in zip(_DP_B, _DP_B_HAT)),
    order=5,
    fsal=True,
)

RK4 = Tableau(
    name="rk4",
    c=(0.0, 0.5, 0.5, 1.0),
    a=((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
    order=4,
)

EULER = Tableau(name="euler", c=(0.0,), a=(), b=(1.0,), order=1)

TABLEAUS = {t.name: t for t in (DOPRI5, RK4, EULER)}
