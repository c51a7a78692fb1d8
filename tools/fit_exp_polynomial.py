"""Fit the polynomial of unihead's float32 exponential (unihead/formulas.py, ``_EXP_Q``).

    python tools/fit_exp_polynomial.py

``exp(r) ~ 1 + r + r**2 Q(r)`` with ``Q`` of degree 4 on ``|r| <= ln(2)/2 + 2e-4`` (the margin
covers the rounding of ``n = round(x log2 e)``), minimising the largest *relative* error of the
whole approximant.  The problem is linear in the coefficients of ``Q``; the minimax solution is
found with Lawson's algorithm (weighted least squares, weights multiplied by the error each
round) on Chebyshev-spaced points.  Prints the float32 coefficients (lowest degree first) and the
worst error of the float32 evaluation, Horner with fused multiply-adds, over a fine grid.
"""

from __future__ import annotations

import numpy as np

HALF_WIDTH = 0.3466 + 2e-4


def fit(points: int = 20001, rounds: int = 400) -> np.ndarray:
    r = np.cos(np.linspace(0.0, np.pi, points)) * HALF_WIDTH
    r = r[np.abs(r) > 1e-6]  # (expm1(r) - r) / r**2 cancels at 0; its limit 1/2 is fitted anyway
    target = (np.expm1(r) - r) / r**2
    scale = r**2 / np.exp(r)  # turns an error in Q into a relative error of the approximant
    basis = np.vander(r, 5, increasing=True)
    w = np.ones_like(r)
    for _ in range(rounds):
        sw = np.sqrt(w) * scale
        coef, *_ = np.linalg.lstsq(basis * sw[:, None], target * sw, rcond=None)
        err = np.abs((basis @ coef - target) * scale)
        w = w * err
        w /= w.sum()
    print(f"minimax relative error {err.max():.3g} (float64 coefficients)")
    return coef.astype(np.float32)


def float32_error(q: np.ndarray, points: int = 2_000_001) -> float:
    """Worst error in float32 ulp of ``fma``-Horner ``1 + r(1 + r Q(r))`` over the interval."""
    r = np.linspace(-HALF_WIDTH, HALF_WIDTH, points).astype(np.float32)

    def fma(a, b, c):  # one rounding: the float32 product is exact in float64
        return (a.astype(np.float64) * b.astype(np.float64) + np.float64(c)).astype(np.float32)

    p = np.full_like(r, q[4])
    for c in (q[3], q[2], q[1], q[0], 1.0, 1.0):
        p = fma(p, r, c)
    exact = np.exp(r.astype(np.float64))
    return float(np.max(np.abs(p - exact) / np.spacing(exact.astype(np.float32))))


if __name__ == "__main__":
    q = fit()
    print("Q coefficients:", ", ".join(f'"{float(c).hex()}"' for c in q))
    print(f"float32 evaluation: worst {float32_error(q):.3f} ulp")
