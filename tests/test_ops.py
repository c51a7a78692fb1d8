"""The array primitives the formulas share, on NumPy, PyTorch and JAX arrays: the compensated
total (unihead._ops) against math.fsum (an exactly rounded sum), and the shifted exponential
(unihead.formulas.shifted_exp) against 50-digit mpmath."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest

from unihead.backends.numpy import NumpyOps
from unihead.conformance.reference import FLT_MIN, ulp_error

from .conftest import require


def _ops(name):
    if name == "numpy":
        return NumpyOps(), np.asarray
    if name == "torch":
        torch = require("torch")
        from unihead.backends.torch import TorchOps

        return TorchOps(), torch.as_tensor
    require("jax")
    import jax.numpy as jnp

    from unihead.backends.jax import JaxOps

    return JaxOps(), jnp.asarray


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 1000, 4097])
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


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
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
    got = np.asarray(ops.to_numpy(shifted_exp(ops, arr(z), arr(np.float32(s)))[0]), np.float64)
    mpmath.mp.dps = 50
    exact = [mpmath.exp(mpmath.mpf(float(zi)) - mpmath.mpf(s)) for zi in z]
    # subnormal results are flushed on XLA: only normal ones are compared
    worst = max(ulp_error(g, e) for g, e in zip(got, exact) if e >= FLT_MIN)
    assert worst <= 1.5


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
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
        got = np.asarray(ops.to_numpy(shifted_exp(ops, arr(z), arr(s32))[0]))
        assert got.tolist() == [0.0] * len(far) + [1.0], s
