"""The one unit of accuracy (unihead._ulp) against independent expectations: the spacing from the
dtypes' bit patterns (the next value up is the next integer), and ulp counts of values a known
number of representable steps apart."""

from __future__ import annotations

import math

import numpy as np
import pytest

from unihead._ulp import spacing, ulp_error, ulp_errors

from .conftest import require

#: dtype name -> (NumPy dtype, unsigned integer type of the same width)
WIDTHS = {"float16": (np.float16, np.uint16), "float32": (np.float32, np.uint32), "float64": (np.float64, np.uint64)}


def _magnitudes(dt):
    """0, subnormals, normals of every binade, and the largest finite value, as ``dt``."""
    fi = np.finfo(dt)
    rng = np.random.default_rng(0)
    normal = rng.uniform(1, 2, 200) * 2.0 ** rng.integers(fi.minexp, fi.maxexp, 200)
    sub = float(fi.smallest_subnormal) * np.array([1, 2, 3, 1000])
    x = np.concatenate([[0.0, float(fi.smallest_normal), 1.0, 1.5, float(fi.max)], sub, normal]).astype(dt)
    return x[np.isfinite(x)]


def _bit_spacing(x, dt, ut):
    """The gap from ``x >= 0`` to the next value up: its bit pattern plus one, minus ``x``."""
    up = (x.astype(dt).view(ut) + ut(1)).view(dt)
    with np.errstate(over="ignore"):
        return up.astype(np.float64) - x.astype(np.float64)


@pytest.mark.parametrize("name", WIDTHS)
def test_spacing_is_the_step_to_the_next_bit_pattern(name):
    dt, ut = WIDTHS[name]
    x = _magnitudes(dt)
    want = _bit_spacing(x, dt, ut)
    np.testing.assert_array_equal(spacing(x, name), want)
    np.testing.assert_array_equal(spacing(-x, name), want)  # a magnitude: the sign does not count
    finite = x < np.finfo(dt).max
    np.testing.assert_array_equal(spacing(x[finite], name), np.spacing(x[finite]).astype(np.float64))
    assert spacing(0.0, name) == float(np.finfo(dt).smallest_subnormal)
    assert spacing(float(np.finfo(dt).max), name) == math.inf  # nothing finite above it


def test_bfloat16_spacing_from_its_bits():
    """bfloat16 is the upper half of float32's bit pattern."""
    ml_dtypes = require("ml_dtypes")
    x = _magnitudes(np.float32).astype(ml_dtypes.bfloat16)
    x = x[np.isfinite(x)].astype(np.float32)  # every one a bfloat16 value
    high = (x.view(np.uint32) >> 16) + 1
    up = (high << 16).astype(np.uint32).view(np.float32)
    with np.errstate(over="ignore"):
        want = up.astype(np.float64) - x.astype(np.float64)
    np.testing.assert_array_equal(spacing(x, "bfloat16"), want)
    assert spacing(1.0, "bfloat16") == 2.0**-7


def test_spacing_rounds_the_magnitude_to_the_dtype_first():
    # 1 + 2**-30 is 1.0 in float32: the ulp there is 1.0's, not the one below
    assert spacing(1.0 + 2.0**-30, "float32") == 2.0**-23
    assert spacing(1.0 - 2.0**-30, "float32") == 2.0**-23
    assert spacing(1.0 - 2.0**-20, "float32") == 2.0**-24


def test_spacing_of_non_finite_magnitudes():
    assert spacing(math.inf, "float32") == math.inf and spacing(-math.inf, "float64") == math.inf
    assert math.isnan(spacing(math.nan, "float32"))
    with pytest.raises(ValueError, match="float16, bfloat16, float32, float64; got 'int8'"):
        spacing(1.0, "int8")


@pytest.mark.parametrize("name", WIDTHS)
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_values_k_bit_patterns_apart_are_k_ulp_apart(name, steps):
    """Within one binade (away from a power of two, where the spacing changes), values ``k`` bit
    patterns apart are ``k`` ulp apart, whichever side is the reference."""
    dt, ut = WIDTHS[name]
    rng = np.random.default_rng(steps)
    fi = np.finfo(dt)
    r = (rng.uniform(1.25, 1.75, 100) * 2.0 ** rng.integers(fi.minexp + 1, fi.maxexp - 1, 100)).astype(dt)
    r = np.concatenate([r, -r])
    v = (r.view(ut) + ut(steps)).view(dt)  # away from zero for either sign
    np.testing.assert_array_equal(ulp_errors(v, r, name), np.full(r.shape, float(steps)))
    np.testing.assert_array_equal(ulp_errors(r, v, name), np.full(r.shape, float(steps)))
    sub = (np.arange(1, 50, dtype=ut) * ut(3)).view(dt)  # subnormals: one spacing throughout
    np.testing.assert_array_equal(ulp_errors((sub.view(ut) + ut(steps)).view(dt), sub, name), float(steps))


def test_below_a_power_of_two_a_step_is_half_an_ulp_of_the_power():
    below = np.nextafter(np.float32(1.0), np.float32(0.0))
    assert ulp_error(below, 1.0, "float32") == 0.5
    assert ulp_error(1.0, below, "float32") == 1.0


def test_non_finite_values_compare_exactly():
    nan, inf = math.nan, math.inf
    v = [nan, inf, -inf, inf, nan, 1.0, inf, 0.0]
    r = [nan, inf, -inf, -inf, 1.0, nan, 1e30, 0.0]
    np.testing.assert_array_equal(ulp_errors(v, r, "float32"), [0, 0, 0, inf, inf, inf, inf, 0])


def test_scale_floor_and_exact_difference():
    # measured at the larger of |ref| and |scale|; a NaN scale is no scale
    assert ulp_error(1.0 + 2.0**-22, 1.0, "float32", scale=4.0) == 0.5
    assert ulp_error(1.0 + 2.0**-22, 1.0, "float32", scale=0.25) == 2.0
    assert ulp_error(1.0 + 2.0**-22, 1.0, "float32", scale=math.nan) == 2.0
    # the allowance comes off the difference first, never below 0
    tiny = float(np.finfo(np.float32).smallest_subnormal)
    assert ulp_error(2.0**-126, 0.0, "float32", floor=2.0**-126) == 0.0
    assert ulp_error(2.0**-126 + 3 * tiny, 0.0, "float32", floor=2.0**-126) == 3.0
    # a difference the caller computed exactly replaces the float64 one
    assert ulp_error(1.0, 1.0, "float64", difference=2.0**-52) == 1.0
    assert ulp_error([], [], "float32") == 0.0


def test_the_reference_measures_in_the_same_unit():
    """conformance.reference.ulp_error (exact differences against mpmath) and unihead._ulp agree
    on float inputs, where the float64 difference is exact."""
    require("mpmath")
    from unihead.conformance.reference import ulp32, ulp64, ulp_error as mp_ulp_error

    rng = np.random.default_rng(5)
    r = rng.normal(size=50) * 10.0 ** rng.integers(-30, 30, 50)
    v = r * (1 + rng.normal(size=50) * 1e-6)
    for name in ("float32", "float64"):
        a = [mp_ulp_error(x, y, name) for x, y in zip(v, r)]
        np.testing.assert_array_equal(a, ulp_errors(v, r, name))
    assert ulp32(1.0) == 2.0**-23 and ulp64(1.0) == 2.0**-52
