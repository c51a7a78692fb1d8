"""The unit in which unihead states accuracy: errors in ulp (units in the last place).

One measure for every place that measures: the conformance suite and its reference
(:mod:`unihead.conformance`), the check of :func:`unihead.port`, the tests and the benchmarks.
It is a unit, not a formula: the conformance reference stays independent of the formulas it
checks (it shares none of :mod:`unihead.formulas`); it and the library measure in the same unit.

An error of ``value`` against ``ref`` is ``|value - ref|`` divided by the spacing of the
dtype's values at the magnitude of ``ref`` (or of a larger ``scale``): the gap from that
magnitude, rounded to the dtype, to the next larger value of the dtype (``np.spacing`` for
float32 and float64; the subnormal spacing near 0).  Non-finite values compare exactly.  NumPy
only: importing this module imports no framework.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["spacing", "ulp_errors", "ulp_error"]

#: The dtypes errors are measured in, by name (bfloat16 is ``ml_dtypes``', imported when used).
DTYPES = ("float16", "bfloat16", "float32", "float64")


def _dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name not in DTYPES:
        raise ValueError(f"errors are measured in ulp of {', '.join(DTYPES)}; got {name!r}.")
    return np.dtype(name)


def _finfo_max(dt: np.dtype) -> float:
    if dt.name == "bfloat16":
        import ml_dtypes

        return float(ml_dtypes.finfo(dt).max)
    return float(np.finfo(dt).max)


def spacing(magnitude: Any, dtype: str = "float32") -> np.ndarray:
    """The ulp of ``dtype`` at ``|magnitude|`` (elementwise, as float64): ``|magnitude|`` rounded
    to ``dtype``, and the gap from it to the next larger value of ``dtype``.  Near 0 the subnormal
    spacing; at the largest finite value and beyond, infinities included, ``inf`` (no finite
    value lies above it: any finite difference there is 0 ulp); NaN at NaN."""
    dt = _dtype(dtype)
    m = np.abs(np.asarray(magnitude, np.float64))
    with np.errstate(all="ignore"):
        t = np.minimum(m, _finfo_max(dt)).astype(dt)
        return np.nextafter(t, np.asarray(np.inf, dt)).astype(np.float64) - t.astype(np.float64)


def ulp_errors(
    value: Any, ref: Any, dtype: str = "float32", *, scale: Any = None, floor: float = 0.0,
    difference: Any = None,
) -> np.ndarray:
    """Elementwise ``|value - ref|`` in ulp of ``dtype`` (float64 array of ``ref``'s shape).

    * The ulp is taken at ``|ref|``, or at ``|scale|`` where that is larger (a gradient measured
      at the size of its terms); a NaN scale is no scale.
    * ``floor``: an absolute allowance subtracted first (what a backend that flushes subnormal
      numbers to zero cannot represent).
    * ``difference``: ``|value - ref|`` computed exactly by the caller (against a multiple-precision
      reference), used instead of the float64 difference.
    * Non-finite values compare exactly: equal ones (NaN with NaN, an infinity with itself) are 0
      ulp apart, any other pair with a non-finite side infinitely many.
    """
    r = np.asarray(ref, np.float64)
    v = np.asarray(value, np.float64).reshape(r.shape)
    with np.errstate(all="ignore"):
        m = np.abs(r) if scale is None else np.fmax(np.abs(r), np.abs(np.asarray(scale, np.float64)))
        d = np.abs(v - r) if difference is None else np.asarray(difference, np.float64)
        e = np.maximum(0.0, d - floor) / spacing(m, dtype)
    finite = np.isfinite(v) & np.isfinite(r)
    same = (v == r) | (np.isnan(v) & np.isnan(r))
    return np.where(finite, e, np.where(same, 0.0, np.inf))


def ulp_error(value: Any, ref: Any, dtype: str = "float32", **kwargs: Any) -> float:
    """The largest of :func:`ulp_errors` (0 for empty arrays)."""
    return float(np.max(ulp_errors(value, ref, dtype, **kwargs), initial=0.0))
