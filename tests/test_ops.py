"""The array primitives the formulas share (unihead._ops): the compensated total, checked against
math.fsum (an exactly rounded sum) on NumPy, PyTorch and JAX arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from unihead.backends.numpy import NumpyOps

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
