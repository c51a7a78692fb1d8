"""The array primitives the formulas share, on NumPy, PyTorch and JAX arrays: the compensated
total (unihead._ops) against math.fsum (an exactly rounded sum), and the shifted exponential
(unihead.formulas.shifted_exp) against 50-digit mpmath, both of its forms: ``exp`` with a TwoSum
correction (NumPy, PyTorch) and the polynomial exponential (JAX; and on NumPy and PyTorch arrays,
"numpy-poly"/"torch-poly", where it runs without fused multiply-adds or flush-to-zero)."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest

from unihead.backends.numpy import NumpyOps
from unihead.conformance.reference import FLT_MIN, ulp_error

from .conftest import require


def _poly(ops):
    ops.poly_exp = True  # an instance attribute: the shared backend instances are untouched
    return ops


def _ops(name):
    if name in ("numpy", "numpy-poly"):
        return (_poly(NumpyOps()) if name == "numpy-poly" else NumpyOps()), np.asarray
    if name in ("torch", "torch-poly"):
        torch = require("torch")
        from unihead.backends.torch import TorchOps

        return (_poly(TorchOps()) if name == "torch-poly" else TorchOps()), torch.as_tensor
    require("jax")
    import jax.numpy as jnp

    from unihead.backends.jax import JaxOps

    return JaxOps(), jnp.asarray


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 1000, 4097, 16000, 123457])  # padded (1000, 16000) and in pieces
def test_compensated_total_is_nearly_correctly_rounded(backend, n):
    ops, arr = _ops(backend)
    rng = np.random.default_rng(n)
    # mixed signs and magnitudes over 2**40: a plain float32 sum loses most of these
    x = (rng.normal(size=n) * np.exp2(rng.integers(-20, 20, size=n))).astype(np.float32)
    exact = math.fsum(float(v) for v in x)
    got = float(np.asarray(ops.compensated_total(arr(x))))
    assert got == pytest.approx(exact, abs=float(np.spacing(np.float32(abs(exact)))))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NumPy on inf - inf
@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_compensated_total_passes_infinities_and_nan_through(backend):
    ops, arr = _ops(backend)
    f = lambda v: float(np.asarray(ops.compensated_total(arr(np.asarray(v, np.float32)))))  # noqa: E731
    assert f([1.0, np.inf, 2.0]) == np.inf
    assert f([-np.inf, 1.0, 2.0, 3.0, 4.0]) == -np.inf
    assert math.isnan(f([np.inf, 1.0, -np.inf]))
    assert math.isnan(f([1.0, np.nan, 2.0]))
    assert f([]) == 0.0


EXP_FORMS = ["numpy", "torch", "jax", "numpy-poly", "torch-poly"]


@pytest.mark.parametrize("backend", EXP_FORMS)
@pytest.mark.parametrize("s", [0.0, 0.3, 7.0, -20.0, -1.7e-3, 123456.8, -1000003.0, 2.0**24 + 2, -(2.0**25)])
def test_shifted_exp_recovers_the_subtraction_error(backend, s):
    """``exp(z - m)`` against 50-digit mpmath: the rounding of ``z - m`` costs up to ~50 ulp at
    ``|z - m| ~ 87`` uncorrected; restored, what is left is the exponential's own error (about
    1 ulp) and one rounding."""
    from unihead.formulas import shifted_exp

    ops, arr = _ops(backend)
    rng = np.random.default_rng(int(abs(s)) % 1000)
    # offsets over the whole normal range of the result, with full-precision fractions, and
    # logits of both signs around the shift (z > m is not a softmax input, but the identity holds)
    t = np.concatenate([rng.uniform(-87.0, 20.0, 2000), rng.uniform(-1.0, 1.0, 200)])
    z = (s + t).astype(np.float32)
    s = float(np.float32(s))
    got = np.asarray(ops.to_numpy(shifted_exp(ops, arr(z), arr(np.float32(s)))), np.float64)
    mpmath.mp.dps = 50
    exact = [mpmath.exp(mpmath.mpf(float(zi)) - mpmath.mpf(s)) for zi in z]
    # subnormal results are flushed on XLA: only normal ones are compared
    worst = max(ulp_error(g, e) for g, e in zip(got, exact) if e >= FLT_MIN)
    assert worst <= 1.5


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # NumPy: -3e38 - 3e38
@pytest.mark.parametrize("backend", EXP_FORMS)
def test_shifted_exp_far_below_the_shift_is_exactly_zero(backend):
    """Masked (``-inf``) logits and logits far below the shift give 0, not NaN, also where the
    shift is so large that its spacing exceeds the underflow gap (there the clamp used to give
    every logit of the row ``exp(0) = 1``)."""
    from unihead.formulas import shifted_exp

    ops, arr = _ops(backend)
    for s in (0.0, -20.0, 1e10, -1e10, 3e38):
        s32 = np.float32(s)
        # the next float below s is far below it for the large shifts (spacing 1024 at 1e10)
        far = [-np.inf, -3e38] + ([np.nextafter(s32, -np.inf)] if abs(s) > 1e9 else [s - 200.0])
        z = np.array(far + [s], np.float32)
        got = np.asarray(ops.to_numpy(shifted_exp(ops, arr(z), arr(s32))))
        assert got.tolist() == [0.0] * len(far) + [1.0], s


@pytest.mark.parametrize("backend", EXP_FORMS)
def test_shifted_exp_at_the_underflow_edge(backend):
    """Around ``z - m = -87.3`` (``exp`` = the smallest normal float32) and the polynomial's cut at
    -88: normal results keep their accuracy, and what is below the smallest normal number is 0
    or a subnormal no larger than it, never garbage from an exponent field out of range."""
    from unihead.formulas import shifted_exp

    ops, arr = _ops(backend)
    s = np.float32(3.25)
    t = np.linspace(-89.0, -86.0, 3001)
    z = (np.float64(s) + t).astype(np.float32)
    got = np.asarray(ops.to_numpy(shifted_exp(ops, arr(z), arr(s))), np.float64)
    mpmath.mp.dps = 50
    exact = [mpmath.exp(mpmath.mpf(float(zi)) - mpmath.mpf(float(s))) for zi in z]
    for g, e in zip(got, exact):
        if e >= FLT_MIN:
            assert ulp_error(g, e) <= 1.5
        else:
            assert 0.0 <= g <= FLT_MIN


def test_polynomial_exponential_constants():
    """The Cody-Waite split of ln 2: ``n * ln2_hi`` exact for ``|n| <= 2**9`` (at most 15
    significant bits), and ``ln2_hi + ln2_lo`` = ln 2 to within half an ulp of ``ln2_lo``
    (``2**-44``): at ``|n| <= 127`` that is below ``2**-37``, far below float32 resolution."""
    from unihead.formulas import exp_poly_coefficients

    c = exp_poly_coefficients()
    mant, _ = math.frexp(c["ln2_hi"])
    assert (mant * 2**15).is_integer()
    assert float(np.float32(c["ln2_lo"])) == c["ln2_lo"]
    mpmath.mp.dps = 50
    assert abs(mpmath.mpf(c["ln2_hi"]) + mpmath.mpf(c["ln2_lo"]) - mpmath.log(2)) <= 2.0**-44
    assert all(float(np.float32(q)) == q for q in c["q"])


def test_polynomial_coefficients_are_the_fit_the_tool_makes():
    """The shipped ``Q`` is what ``tools/fit_exp_polynomial.py`` fits (each coefficient within one
    float32 spacing: 400 rounds of least squares may round differently under another BLAS), and
    the float32 evaluation, Horner with fused multiply-adds, stays below 0.75 ulp on
    ``|r| <= ln(2)/2`` plus margin (0.737 measured)."""
    import importlib.util
    from pathlib import Path

    from unihead.formulas import exp_poly_coefficients

    path = Path(__file__).resolve().parents[1] / "tools" / "fit_exp_polynomial.py"
    spec = importlib.util.spec_from_file_location("fit_exp_polynomial", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    shipped = np.asarray(exp_poly_coefficients()["q"], np.float32)
    fitted = tool.fit()
    assert np.all(np.abs(fitted - shipped) <= np.spacing(shipped))
    assert tool.float32_error(shipped) < 0.75
