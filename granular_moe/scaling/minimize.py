"""Brent's method for a one-dimensional minimum on an interval (the paper's solver, Section 6.2)."""

from __future__ import annotations

import math
from typing import Callable

_GOLDEN = 0.5 * (3.0 - math.sqrt(5.0))
_SQRT_EPS = math.sqrt(2.2e-16)


def minimize_bounded(f: Callable[[float], float], low: float, high: float, xtol: float = 1e-12) -> float:
    """The ``x`` in ``[low, high]`` minimising a unimodal ``f``: golden-section steps with parabolic
    interpolation (Brent 1973, "Algorithms for Minimization without Derivatives", ch. 5), endpoints included."""
    if low > high:
        raise ValueError(f"empty interval [{low}, {high}]")
    if low == high:
        return low
    a, b = low, high
    x = w = v = a + _GOLDEN * (b - a)
    fx = fw = fv = f(x)
    d = e = 0.0
    for _ in range(500):
        middle = 0.5 * (a + b)
        tol1 = _SQRT_EPS * abs(x) + xtol / 3.0
        tol2 = 2.0 * tol1
        if abs(x - middle) <= tol2 - 0.5 * (b - a):
            break
        golden_step = True
        if abs(e) > tol1:
            r = (x - w) * (fx - fv)
            q = (x - v) * (fx - fw)
            p = (x - v) * q - (x - w) * r
            q = 2.0 * (q - r)
            if q > 0.0:
                p = -p
            q = abs(q)
            previous_e, e = e, d
            if abs(p) < abs(0.5 * q * previous_e) and q * (a - x) < p < q * (b - x):
                d = p / q
                u = x + d
                if u - a < tol2 or b - u < tol2:
                    d = math.copysign(tol1, middle - x)
                golden_step = False
        if golden_step:
            e = (a - x) if x >= middle else (b - x)
            d = _GOLDEN * e
        u = x + (d if abs(d) >= tol1 else math.copysign(tol1, d))
        fu = f(u)
        if fu <= fx:
            if u >= x:
                a = x
            else:
                b = x
            v, fv, w, fw, x, fx = w, fw, x, fx, u, fu
        else:
            if u < x:
                a = u
            else:
                b = u
            if fu <= fw or w == x:
                v, fv, w, fw = w, fw, u, fu
            elif fu <= fv or v == x or v == w:
                v, fv = u, fu
    # Brent's search never evaluates the endpoints: a minimum on the boundary (an active constraint) is exact.
    return min((fx, x), (f(low), low), (f(high), high))[1]
